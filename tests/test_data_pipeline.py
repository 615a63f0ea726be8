"""VisRel TFDS builder (built and read without TensorFlow) and the grain input pipeline."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SIZE = 32
REPO = Path(__file__).resolve().parents[1]


def _save(path: Path, arr: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path)


def _task(root: Path, name: str, **meta) -> Path:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "task.json").write_text(json.dumps(meta))
    return d


def make_source_folder(root: Path) -> None:
    """12 episodes: invert (3 quads), gray_pairs (3 pairs -> 6), mixed (1 quad + 2 pairs -> 2)."""
    rng = np.random.default_rng(0)
    # invert: A_out = 255 - A at exactly SIZE, so the build does not resample and the relation is exact.
    d = _task(root, "invert", label="invert colors", category="color", output_kind="image", augment_flip=True)
    for q in range(3):
        a, b = (rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(2))
        for role, arr in dict(A=a, A_out=255 - a, B=b, B_out=255 - b).items():
            _save(d / "quads" / f"q{q}.{role}.png", arr)
    # gray_pairs: grayscale 64x32 inputs (gray center square of 200, black sides: checks center crop),
    # RGBA outputs of other sizes (transparent left half: checks the white alpha composite).
    d = _task(root, "gray_pairs", label="gray to mask", category="segmentation", output_kind="mask",
              augment_flip=False)
    for p in range(3):
        g = np.zeros((32, 64), np.uint8)
        g[:, 16:48] = 200
        _save(d / "pairs" / f"p.{p}.input.png", g, "L")  # the id "p.<n>" contains a dot
        o = np.zeros((40 + 4 * p, 40 + 4 * p, 4), np.uint8)
        o[..., 1] = 100
        o[:, o.shape[1] // 2:, 3] = 255
        _save(d / "pairs" / f"p.{p}.output.png", o, "RGBA")
    # mixed: one quad (mixed sizes, one JPEG) and two pairs.
    d = _task(root, "mixed", label="mixed bag", category="misc", output_kind="image", augment_flip=False)
    for role, shape in dict(A=(48, 64, 3), A_out=(50, 50, 3), B=(20, 30, 3), B_out=(64, 64, 3)).items():
        _save(d / "quads" / f"m.{role}.png", rng.integers(0, 256, shape, dtype=np.uint8))
    for p in range(2):
        _save(d / "pairs" / f"x{p}.input.png", rng.integers(0, 256, (36, 36, 3), dtype=np.uint8))
    Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(d / "pairs" / "x0.output.jpg")
    _save(d / "pairs" / "x1.output.png", rng.integers(0, 256, (36, 36, 3), dtype=np.uint8))


_BUILD_AND_READ = textwrap.dedent("""
    import json, sys
    from pico_jax.data.visrel import build_visrel, load_visrel
    src, data_dir, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    builder = build_visrel(src, data_dir, size)
    train = builder.as_data_source()["train"]
    n_builder = len(train)
    ex = train[0]
    source = load_visrel(data_dir)
    rows = []
    for i in range(len(source)):
        e = source[i]
        rows.append({k: v for k, v in e.items() if k not in ("A", "A_out", "B", "B_out")})
        for k in ("A", "A_out", "B", "B_out"):
            assert e[k].shape == (size, size, 3) and e[k].dtype.name == "uint8", (k, e[k].shape, e[k].dtype)
    assert "tensorflow" not in sys.modules, sorted(m for m in sys.modules if m.startswith("tensorflow."))
    print("RESULT" + json.dumps(dict(n_builder=n_builder, rows=rows, task_names=source.task_names,
                                     builder_dir=str(builder.data_dir), tf=any(
                                         m == "tensorflow" or m.startswith("tensorflow.") for m in sys.modules))))
""")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Builds the VisRel dataset in a fresh subprocess (which also reads it and checks for TF)."""
    tmp = tmp_path_factory.mktemp("visrel")
    src, data_dir = tmp / "src", tmp / "data"
    make_source_folder(src)
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, "-c", _BUILD_AND_READ, str(src), str(data_dir), str(SIZE)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    return dict(json.loads(line[len("RESULT"):]), src=src, data_dir=data_dir)


# ------------------------------------------------------------------------------------------------
# Builder
# ------------------------------------------------------------------------------------------------


def test_build_and_read_without_tensorflow(built):
    assert built["tf"] is False
    assert built["n_builder"] == 12
    rows = built["rows"]
    assert built["task_names"] == ["gray_pairs", "invert", "mixed"]
    by_task = {}
    for r in rows:
        by_task.setdefault(r["task_name"], []).append(r["episode"])
        assert built["task_names"][r["task_id"]] == r["task_name"]
    assert sorted(by_task["invert"]) == ["quads/q0", "quads/q1", "quads/q2"]
    assert sorted(by_task["gray_pairs"]) == sorted(f"pairs/p.{i}|p.{j}" for i in range(3) for j in range(3) if i != j)
    assert sorted(by_task["mixed"]) == ["pairs/x0|x1", "pairs/x1|x0", "quads/m"]
    meta = {r["task_name"]: (r["task"], r["category"], r["output_kind"], r["augment_flip"]) for r in rows}
    assert meta == {"invert": ("invert colors", "color", "image", True),
                    "gray_pairs": ("gray to mask", "segmentation", "mask", False),
                    "mixed": ("mixed bag", "misc", "image", False)}
    assert all(isinstance(r["augment_flip"], bool) for r in rows)


def test_panel_conversion_and_resize_policy(built):
    from pico_jax.data.visrel import load_visrel

    src = load_visrel(built["data_dir"])
    seen = 0
    for i in range(len(src)):
        ex = src[i]
        if ex["task_name"] == "gray_pairs":
            # gray -> RGB, center square of the 64x32 input is the gray 200 band (black sides cropped).
            assert np.all(np.abs(ex["A"].astype(int) - 200) <= 1)
            # RGBA: the transparent left half is composited onto white, the opaque half kept.
            out = ex["A_out"].astype(int)
            np.testing.assert_allclose(out[:, :8], 255, atol=1)
            assert np.all(np.abs(out[:, -8:] - np.array([0, 100, 0])) <= 1)
            seen += 1
        if ex["task_name"] == "invert":  # stored at SIZE: no resampling, exact.
            np.testing.assert_array_equal(ex["A_out"], 255 - ex["A"])
            np.testing.assert_array_equal(ex["B_out"], 255 - ex["B"])
    assert seen == 6


def _error_case(tmp_path: Path, kind: str) -> str:
    root = tmp_path / "src"
    rng = np.random.default_rng(1)
    img = lambda: rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)  # noqa: E731
    d = _task(root, "ok", label="fine")
    for role in ("A", "A_out", "B", "B_out"):
        _save(d / "quads" / f"0.{role}.png", img())
    if kind == "missing_task_json":
        bad = root / "nojson"
        _save(bad / "pairs" / "a.input.png", img())
        return str(bad / "task.json")
    if kind == "too_few_pairs":
        bad = _task(root, "lonely", label="one pair")
        _save(bad / "pairs" / "a.input.png", img())
        _save(bad / "pairs" / "a.output.png", img())
        return str(bad)
    if kind == "unreadable_image":
        bad = _task(root, "broken", label="broken")
        for p in "ab":
            _save(bad / "pairs" / f"{p}.input.png", img())
            _save(bad / "pairs" / f"{p}.output.png", img())
        (bad / "pairs" / "b.output.png").write_bytes(b"this is not a png")
        return str(bad / "pairs" / "b.output.png")
    if kind == "mismatched_pair":
        bad = _task(root, "mismatch", label="mismatch")
        for p in "ab":
            _save(bad / "pairs" / f"{p}.input.png", img())
            _save(bad / "pairs" / f"{p}.output.png", img())
        _save(bad / "pairs" / "c.input.png", img())
        return str(bad / "pairs" / "c.input.png")
    if kind == "incomplete_quad":
        for role in ("A", "A_out", "B"):
            _save(d / "quads" / f"1.{role}.png", img())
        return "1.B_out.png"
    if kind == "bad_name":
        _save(d / "quads" / "2.Aout.png", img())
        return str(d / "quads" / "2.Aout.png")
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing_task_json", "too_few_pairs", "unreadable_image", "mismatched_pair",
                                  "incomplete_quad", "bad_name"])
def test_build_errors_name_the_file(tmp_path, kind):
    from pico_jax.data.visrel import VisRelError, build_visrel

    needle = _error_case(tmp_path, kind)
    with pytest.raises(VisRelError, match=re.escape(needle)):
        build_visrel(tmp_path / "src", tmp_path / "data", 8)


def test_load_errors(tmp_path):
    from pico_jax.data.visrel import VisRelError, load_visrel

    with pytest.raises(VisRelError, match="build_visrel"):
        load_visrel(tmp_path)


# ------------------------------------------------------------------------------------------------
# Input pipeline
# ------------------------------------------------------------------------------------------------


def _batches(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]


def _assert_same(b1, b2):
    assert len(b1) == len(b2)
    for x, y in zip(b1, b2):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_pipeline_batches_and_determinism(built):
    from pico_jax.data.input_pipeline import make_dataset
    from pico_jax.data.visrel import load_visrel

    src = load_visrel(built["data_dir"])
    kw = dict(batch_size=4, image_size=24, shard_index=0, shard_count=1)
    ds = make_dataset(src, seed=3, **kw)
    assert ds.task_names == ["gray_pairs", "invert", "mixed"]
    b1 = _batches(ds, 4)  # 16 > 12 examples: crosses the epoch boundary
    for b in b1:
        assert set(b) == {"A", "A_out", "B", "B_out", "task_id"}
        for k in ("A", "A_out", "B", "B_out"):
            assert b[k].shape == (4, 24, 24, 3) and b[k].dtype == np.float32
            assert b[k].min() >= -1.0 and b[k].max() <= 1.0
        assert b["task_id"].shape == (4,) and b["task_id"].dtype == np.int32
    _assert_same(b1, _batches(make_dataset(src, seed=3, **kw), 4))
    other = _batches(make_dataset(src, seed=4, **kw), 4)
    assert any(not np.array_equal(x["A"], y["A"]) for x, y in zip(b1, other))


class _IndexSource:
    """Example i has constant panels of value i / 255 (identifiable after conversion)."""

    def __init__(self, n):
        self.n, self.task_names = n, ["t0", "t1"]

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        a = np.full((4, 4, 3), i, np.uint8)
        return dict(A=a, A_out=a, B=a, B_out=a, task_name=f"t{i % 2}")


def _ids(batches):
    return [int(round((v + 1) / 2 * 255)) for b in batches for v in b["A"][:, 0, 0, 0]]


@pytest.mark.parametrize("n", [10, 11])
def test_sharding_partitions_each_epoch(n):
    from pico_jax.data.input_pipeline import make_dataset

    src = _IndexSource(n)
    per_host = []
    for host in range(2):
        ds = make_dataset(src, batch_size=1, seed=7, augment=False, num_epochs=1, shard_index=host, shard_count=2)
        per_host.append(_ids(list(ds)))
    assert len(per_host[0]) == len(per_host[1]) == n // 2
    assert not set(per_host[0]) & set(per_host[1])
    assert len(set(per_host[0]) | set(per_host[1])) == n // 2 * 2
    if n == 10:
        assert set(per_host[0]) | set(per_host[1]) == set(range(10))
    if n == 10:  # infinite repeat: every epoch is reshuffled and still split disjointly by the hosts
        streams = [_ids(_batches(make_dataset(src, batch_size=5, seed=7, augment=False, shard_index=h,
                                              shard_count=2), 4)) for h in range(2)]
        for epoch in range(4):
            e0, e1 = (set(s[epoch * 5:(epoch + 1) * 5]) for s in streams)
            assert e0 | e1 == set(range(10)) and not e0 & e1
        assert streams[0][:5] != streams[0][5:10] or streams[1][:5] != streams[1][5:10]
    # The task id follows the task name.
    b = next(iter(make_dataset(src, batch_size=4, seed=0, augment=False, shard_index=0, shard_count=1)))
    np.testing.assert_array_equal(b["task_id"], np.array(_ids([b])) % 2)


@pytest.mark.parametrize("num_epochs", [None, 1])
def test_hosts_side_by_side_read_what_one_host_reads(num_epochs):
    """Two hosts' batches, concatenated as the trainer's global batch lays them out, are exactly one
    host's batch of twice the size (augmentation included): the data does not depend on the host count."""
    from pico_jax.data.input_pipeline import make_dataset

    class Noisy(_IndexSource):  # random pixels, so every crop, flip and swap shows
        def __getitem__(self, i):
            a, b = np.random.default_rng(i).integers(0, 256, (2, 12, 12, 3), np.uint8)
            return dict(A=a, A_out=255 - a, B=b, B_out=255 - b, task_name=f"t{i % 2}", augment_flip=True)

    src = Noisy(23)
    kw = dict(seed=3, image_size=8, num_epochs=num_epochs, drop_remainder=False)
    one = list(make_dataset(src, batch_size=6, shard_index=0, shard_count=1, **kw)) if num_epochs else \
        _batches(make_dataset(src, batch_size=6, shard_index=0, shard_count=1, **kw), 9)
    hosts = [list(make_dataset(src, batch_size=3, shard_index=h, shard_count=2, **kw)) if num_epochs else
             _batches(make_dataset(src, batch_size=3, shard_index=h, shard_count=2, **kw), 9) for h in range(2)]
    if num_epochs:  # 23 → 22 (a multiple of the hosts): 3 full global batches and a last one of 4, 2 per host
        assert [len(b["A"]) for b in hosts[0]] == [3, 3, 3, 2] == [len(b["A"]) for b in hosts[1]]
        one[-1] = {k: v[:4] for k, v in one[-1].items()}
    assert len(one) == len(hosts[0]) == len(hosts[1])
    for k, (whole, h0, h1) in enumerate(zip(one, *hosts)):
        for key in ("A", "A_out", "B", "B_out", "task_id"):
            np.testing.assert_array_equal(np.concatenate([h0[key], h1[key]]), whole[key], err_msg=f"batch {k} {key}")


def test_augmentation_keeps_pixelwise_relation(built):
    from pico_jax.data.input_pipeline import make_dataset
    from pico_jax.data.visrel import load_visrel

    src = load_visrel(built["data_dir"])
    invert = [src[i] for i in range(len(src)) if src[i]["task_name"] == "invert"]
    assert len(invert) == 3 and all(e["augment_flip"] for e in invert)
    ds = make_dataset(invert, batch_size=3, seed=11, image_size=20, crop_scale=(0.2, 1.0), task_names=src.task_names,
                      shard_index=0, shard_count=1)
    plain = next(iter(make_dataset(invert, batch_size=3, seed=11, image_size=20, augment=False, shuffle=False,
                                   task_names=src.task_names, shard_index=0, shard_count=1)))
    batches = _batches(ds, 6)
    for b in batches:
        # Inversion is affine per pixel: it survives a shared linear crop-resize and a shared flip,
        # and would break if any panel were cropped or flipped differently.
        np.testing.assert_allclose(b["A_out"], -b["A"], atol=1e-5)
        np.testing.assert_allclose(b["B_out"], -b["B"], atol=1e-5)
        assert np.all(b["task_id"] == 1)
        for k in ("A", "B"):  # augmented panels differ from the un-augmented resize
            assert not any(np.allclose(x, y, atol=1e-3) for x in b[k] for y in plain[k])

    # Exact geometry: a flip-only augmentation flips all four panels; no flip without augment_flip.
    from pico_jax.data.input_pipeline import _Process

    rng = np.random.default_rng(0)
    x = {k: rng.random((6, 6, 3), dtype=np.float32) for k in ("A", "A_out", "B", "B_out")}
    proc = _Process({"t": 0}, None, True, (1.0, 1.0), (1.0, 1.0), swap_prob=0.0, flip_prob=1.0)
    out = proc(dict(x, task_name="t", augment_flip=True), np.random.default_rng(1))
    noflip = proc(dict(x, task_name="t", augment_flip=False), np.random.default_rng(1))
    for k in x:
        np.testing.assert_allclose(out[k], x[k][:, ::-1] * 2 - 1, atol=1e-6)
        np.testing.assert_allclose(noflip[k], x[k] * 2 - 1, atol=1e-6)
    swap = _Process({"t": 0}, None, True, (1.0, 1.0), (1.0, 1.0), swap_prob=1.0, flip_prob=0.0)
    out = swap(dict(x, task_name="t", augment_flip=True), np.random.default_rng(1))
    for k, src_k in dict(A="B", A_out="B_out", B="A", B_out="A_out").items():
        np.testing.assert_allclose(out[k], x[src_k] * 2 - 1, atol=1e-6)


@dataclasses.dataclass
class _Episode:  # stand-in for pico_jax.data.relations.Episode
    A: np.ndarray
    A_out: np.ndarray
    B: np.ndarray
    B_out: np.ndarray


def _channel_swap_example(i: int):
    from pico_jax.data.input_pipeline import episode_to_example

    rng = np.random.default_rng(i)
    a, b = rng.random((20, 28, 3), dtype=np.float32), rng.random((20, 28, 3), dtype=np.float32)
    fam = ["rgb_to_bgr", "rgb_to_bgr_2"][i % 2]
    return episode_to_example(_Episode(a, a[..., ::-1], b, b[..., ::-1]), fam, augment_flip=True)


def test_worker_processes_deliver_the_same_batches_and_resume(built):
    """worker_count > 0 (grain's mp_prefetch, spawned processes reading the TFDS files) yields the
    batches of no workers, in order; its iterator state resumes on the next batch, and so does
    start_batch, with or without workers."""
    from pico_jax.data.input_pipeline import make_dataset, state_from_bytes, state_to_bytes
    from pico_jax.data.visrel import load_visrel

    src = load_visrel(built["data_dir"])
    make = lambda w, start=0: make_dataset(src, batch_size=2, seed=5, image_size=16,  # noqa: E731
                                           shard_index=1, shard_count=2, worker_count=w, start_batch=start)
    plain = _batches(make(0), 7)  # 14 examples > 6 per host per epoch: crosses epochs
    _assert_same(_batches(make(0, start=4), 3), plain[4:])  # a position alone resumes the stream
    it = iter(make(3))
    try:
        got = [next(it) for _ in range(4)]
        state = state_to_bytes(it)
        got += [next(it) for _ in range(3)]
    finally:
        it.close()
    _assert_same(got, plain)
    resumed = state_from_bytes(iter(make(3)), state)
    try:
        _assert_same([next(resumed) for _ in range(3)], plain[4:])
    finally:
        resumed.close()
    started = iter(make(2, start=4))  # ... with another worker count
    try:
        _assert_same([next(started) for _ in range(3)], plain[4:])
    finally:
        started.close()
    with pytest.raises(ValueError, match="worker_count must be >= 0"):
        make(-1)
    with pytest.raises(ValueError, match="start_batch must be >= 0"):
        make(0, start=-1)


def test_worker_processes_on_a_finite_stream_keep_every_example():
    """On one epoch the groups of workers x batch are the no-worker batches; the last, incomplete
    group comes grouped by worker, and no example is lost or repeated."""
    from pico_jax.data.input_pipeline import make_dataset

    kw = dict(batch_size=2, seed=1, augment=False, num_epochs=1, drop_remainder=False, shard_index=0, shard_count=1)
    plain = list(make_dataset(_IndexSource(11), **kw))
    it = iter(make_dataset(_IndexSource(11), worker_count=2, **kw))
    try:
        got = list(it)
    finally:
        it.close()
    assert _ids(got[:4]) == _ids(plain[:4])  # two full groups of 2 workers x 2
    assert sorted(_ids(got)) == sorted(_ids(plain)) == list(range(11))


def test_function_source_for_procedural_episodes():
    from pico_jax.data.input_pipeline import FunctionSource, make_dataset

    src = FunctionSource(_channel_swap_example, length=1000, task_names=["rgb_to_bgr_2", "rgb_to_bgr"])
    ds = make_dataset(src, batch_size=4, seed=0, image_size=16, crop_scale=(0.3, 1.0), shard_index=0, shard_count=1)
    assert ds.task_names == ["rgb_to_bgr", "rgb_to_bgr_2"]
    for b in _batches(ds, 2):
        assert b["A"].shape == (4, 16, 16, 3)
        np.testing.assert_allclose(b["A_out"], b["A"][..., ::-1], atol=1e-6)  # per-channel relation: exact
        np.testing.assert_allclose(b["B_out"], b["B"][..., ::-1], atol=1e-6)
        assert set(b["task_id"].tolist()) <= {0, 1}


def test_iterator_checkpoint_resumes_on_next_batch(built):
    from pico_jax.data.input_pipeline import make_dataset, state_from_bytes, state_to_bytes
    from pico_jax.data.visrel import load_visrel

    src = load_visrel(built["data_dir"])
    make = lambda: make_dataset(src, batch_size=2, seed=5, image_size=16,  # noqa: E731
                                shard_index=1, shard_count=2, num_threads=2)
    it = iter(make())
    [next(it) for _ in range(3)]
    state = state_to_bytes(it)
    assert isinstance(state, bytes) and json.loads(state)
    expected = [next(it) for _ in range(2)]
    restored = state_from_bytes(iter(make()), state)
    _assert_same([next(restored) for _ in range(2)], expected)
    # get_state / set_state directly on the grain iterator.
    it2 = iter(make())
    it2.set_state(json.loads(state))
    _assert_same([next(it2) for _ in range(2)], expected)
