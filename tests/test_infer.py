"""The inference CLI, in-process (`pico_jax.infer.main([...])`) on a tiny random pico checkpoint:
outputs and scores.json, manifest mode, exit code 2 with a message naming the culprit for every
bad input, and no partial or temporary files after a failure."""

import json
import os
import re

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from pico_jax import imageio
from pico_jax.checkpoints import save_pico
from pico_jax.infer import main, unique_names
from pico_jax.model.flux import FluxConfig, FluxTransformer
from pico_jax.pipeline import SamplingPlan
from pico_jax.scorer import ScorerConfig

PANEL = 16
CFG = FluxConfig(num_double=1, num_single=1, num_heads=2, head_dim=16, axes_dims_rope=(4, 6, 6), in_channels=112,
                 out_channels=48, context_dim=16, pooled_dim=16, guidance_embeds=False)
PLAN = SamplingPlan(steps=2, seeds=2, keep=1, selection="early", scorer=ScorerConfig(steps=1))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = FluxTransformer(CFG, rngs=nnx.Rngs(0))
    return str(save_pico(tmp_path_factory.mktemp("ck") / "pico", model, panel=PANEL,
                         autoencoder={"kind": "pixel", "factor": 2}, plan=PLAN))


def _png(path, size_wh=(16, 16), seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (size_wh[1], size_wh[0], len(mode)), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a, mode).save(path)
    return str(path)


@pytest.fixture
def imgs(tmp_path):
    d = tmp_path / "in"
    return {
        "a": _png(d / "a.png", seed=1),
        "a_out": _png(d / "a_out.png", seed=2),
        "b": _png(d / "b.png", (20, 12), seed=3),  # W × H = 20 × 12
        "b2": _png(d / "x" / "b.png", (9, 31), seed=4, mode="RGBA"),  # same stem, other dir
    }


def _files(out):
    return sorted(p.name for p in out.iterdir()) if out.exists() else []


def _no_temp(out):
    return [n for n in _files(out) if n.startswith(".") or "tmp" in n]


def _readable_png(path):
    with Image.open(path) as im:
        im.load()
        return im.size


def test_writes_outputs_at_query_size_and_scores(tmp_path, imgs, checkpoint, capsys):
    out = tmp_path / "out"
    rc = main(["--checkpoint", checkpoint, "--exemplar", imgs["a"], imgs["a_out"], "--query", imgs["b"],
               "--query", imgs["b2"], "--out", str(out), "--seeds", "3", "--keep", "2", "--save-candidates",
               "--seed", "5", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert _files(out) == sorted(["b.png", "b_grid.png", "b_cand0.png", "b_cand1.png",
                                  "b_1.png", "b_1_grid.png", "b_1_cand0.png", "b_1_cand1.png", "scores.json"])
    assert _readable_png(out / "b.png") == (20, 12)  # the query's original size
    assert _readable_png(out / "b_1.png") == (9, 31)
    assert _readable_png(out / "b_grid.png") == (2 * PANEL, 2 * PANEL)
    assert _readable_png(out / "b_cand0.png") == (PANEL, PANEL)
    report = json.loads((out / "scores.json").read_text())
    assert set(report["queries"]) == {"b", "b_1"}
    for name, q in report["queries"].items():
        assert q["seeds"] == [5, 6, 7] and len(q["scores"]) == 3
        assert all(isinstance(s, float) for s in q["scores"])
        assert q["chosen_seed"] == q["seeds"][int(np.argmax(q["scores"]))]
    assert report["queries"]["b_1"]["query"] == imgs["b2"]
    assert report["plan"]["seeds"] == 3 and report["plan"]["keep"] == 2 and report["plan"]["steps"] == PLAN.steps
    # The B' panel of the grid is the output (resized), the other panels are the inputs.
    with Image.open(out / "b_grid.png") as g:
        grid_img = np.asarray(g.convert("RGB"))
    with Image.open(out / "b_cand0.png") as c:
        np.testing.assert_array_equal(grid_img[PANEL:, PANEL:], np.asarray(c.convert("RGB")))
    with Image.open(imgs["a"]) as a:
        np.testing.assert_array_equal(grid_img[:PANEL, :PANEL], np.asarray(a))
    assert not _no_temp(out)


def test_profile_traces_the_second_batch_and_the_rate_leaves_out_the_first(tmp_path, imgs, checkpoint, capsys):
    """--profile: one jax.profiler trace, of the second batch only (the first compiles), and the
    summary line gives the time of the first batch and the rate of the others."""
    import gzip

    out, prof = tmp_path / "out", tmp_path / "prof"
    rc = main(["--checkpoint", checkpoint, "--exemplar", imgs["a"], imgs["a_out"], "--query", imgs["b"],
               "--query", imgs["b2"], "--query", imgs["b"], "--batch-size", "1", "--out", str(out),
               "--profile", str(prof), "--no-progress"])
    stdout = capsys.readouterr().out
    assert rc == 0
    (trace,) = prof.rglob("*.trace.json.gz")
    events = json.load(gzip.open(trace))["traceEvents"]
    assert [int(e["args"]["step_num"]) for e in events if e.get("name") == "infer"] == [1]
    assert "profile: batch 2 of 3 traced to" in stdout
    assert re.search(r"wrote 3 result\(s\) .* s for the first batch, which compiles, then [0-9.e+-]+ queries/s", stdout)


def test_the_fitted_program_line_names_what_the_memory_chose_and_why():
    from pico_jax.infer import fitted_program_line
    from pico_jax.pipeline import FittedProgram

    G = 2**30
    both = FittedProgram(2, "per_layer", {(4, "per_call"): 40 * G, (4, "per_layer"): 30 * G, (2, "per_call"): 25 * G,
                                          (2, "per_layer"): 15 * G}, ("seed_batch", "gather_weights"))
    assert fitted_program_line(both, 4) == (
        "seeds ran 2 at a time: all 4 together planned 30.00 GiB per device, over the memory budget (--seed-batch "
        "sets it); weights gathered layer by layer: gathered once per batch they planned 25.00 GiB per device, over "
        "the memory budget (--gather-weights sets it)")
    once = FittedProgram(None, "per_call", {(None, "per_call"): G}, ("gather_weights",))
    assert fitted_program_line(once, 8) == "weights gathered once per batch (1.00 GiB planned per device)"
    assert fitted_program_line(FittedProgram(4, "per_layer", {(4, "per_layer"): G}, ("seed_batch",)), 4) == ""


def test_seeds_fitted_to_the_memory_are_reported(tmp_path, imgs, checkpoint, capsys, monkeypatch):
    """Where the seed batch is left open and all seeds together would not fit (simulated: the GPU
    default and a budget no program meets), the run says how many ran together and why, and
    scores.json records it; the images are those of --seed-batch 1."""
    import pico_jax.memory as memory
    import pico_jax.pipeline as pipeline_module

    args = ["--checkpoint", checkpoint, "--exemplar", imgs["a"], imgs["a_out"], "--query", imgs["b"], "--seeds", "3",
            "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "one"), "--seed-batch", "1"]) == 0
    monkeypatch.setattr(pipeline_module, "seed_batch_for_backend", lambda seeds, backend=None: seeds)
    monkeypatch.setattr(memory, "memory_budget", lambda gib=0.0: (1.0, 1))
    with pytest.warns(UserWarning, match="even with one seed at a time"):
        assert main([*args, "--out", str(tmp_path / "fitted")]) == 0
    stdout = capsys.readouterr().out
    assert re.search(r"seeds ran 1 at a time: all 3 together planned [0-9.]+ GiB per device, over the memory budget", stdout)
    assert json.loads((tmp_path / "fitted" / "scores.json").read_text())["seed_batch_run"] == 1
    assert "seed_batch_run" not in json.loads((tmp_path / "one" / "scores.json").read_text())
    for name in ("b.png", "b_grid.png"):
        a, b = (np.asarray(Image.open(tmp_path / k / name)) for k in ("one", "fitted"))
        np.testing.assert_array_equal(a, b)


def test_throughput_line():
    from pico_jax.infer import profiled_batch, throughput_line

    assert throughput_line([2.0], [4]) == " (2.0 s)"
    assert throughput_line([3.0, 1.0, 1.0], [4, 4, 2]) == \
        " (5.0 s; 3.0 s for the first batch, which compiles, then 3 queries/s)"
    assert (profiled_batch(1), profiled_batch(2), profiled_batch(9)) == (0, 1, 1)


def test_manifest_relative_paths_and_unique_names(tmp_path, imgs, checkpoint, monkeypatch, capsys):
    mdir = tmp_path / "in"  # manifest next to the images, paths relative to it
    rows = [
        {"exemplar": "a.png", "exemplar_out": "a_out.png", "query": "b.png"},
        {"exemplar": "a.png", "exemplar_out": "a_out.png", "query": "x/b.png"},
        {"exemplar": "a.png", "exemplar_out": "a_out.png", "query": "b.png", "name": "custom"},
        {"exemplar": imgs["a"], "exemplar_out": imgs["a_out"], "query": imgs["b"]},  # absolute
    ]
    (mdir / "triples.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative paths resolve against the manifest, not the cwd
    rc = main(["--checkpoint", checkpoint, "--manifest", str(mdir / "triples.jsonl"), "--out", "res",
               "--batch-size", "3", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    out = elsewhere / "res"
    names = ["b", "b_1", "custom", "b_2"]
    assert _files(out) == sorted([f"{n}.png" for n in names] + [f"{n}_grid.png" for n in names] + ["scores.json"])
    report = json.loads((out / "scores.json").read_text())
    assert list(report["queries"]) == names
    assert report["queries"]["b_1"]["query"] == str(mdir / "x/b.png")
    assert _readable_png(out / "b_1.png") == (9, 31)
    # Same query and seeds → same output, whatever the name and batch position.
    for n in ("custom", "b_2"):
        assert report["queries"][n]["scores"] == pytest.approx(report["queries"]["b"]["scores"], abs=1e-6)


def test_unique_names_never_collide():
    assert unique_names(["d/b.png", "e/b.png", "f/b_1.png"], [None] * 3) == ["b", "b_1", "b_1_1"]
    assert unique_names(["b_1.png", "b.png", "b.png"], [None] * 3) == ["b_1", "b", "b_2"]
    assert unique_names(["q.png", "r.png"], ["n", "n"]) == ["n", "n_1"]


# ------------------------------------------------------------------------------ bad inputs
def _bad_inputs(tmp_path, imgs, checkpoint):
    t = tmp_path
    (t / "notimg.png").write_text("this is not an image")
    (t / "empty.png").write_bytes(b"")
    (t / "badjson.jsonl").write_text(json.dumps({"exemplar": "a.png", "exemplar_out": "a.png", "query": "a.png"})
                                     + "\n{oops\n")
    (t / "nokey.jsonl").write_text(json.dumps({"exemplar": imgs["a"], "exemplar_out": imgs["a"]}) + "\n")
    (t / "notobj.jsonl").write_text('"a.png"\n')
    (t / "badname.jsonl").write_text(json.dumps({"exemplar": imgs["a"], "exemplar_out": imgs["a_out"], "query": imgs["b"],
                                                 "name": "../escape"}) + "\n")
    (t / "not_pico").mkdir()
    ex = ["--exemplar", imgs["a"], imgs["a_out"]]
    ck = ["--checkpoint", checkpoint]
    return {
        "missing image": (ck + ex + ["--query", str(t / "nope.png")], ["nope.png", "not found"]),
        "missing exemplar": (ck + ["--exemplar", str(t / "gone.png"), imgs["a_out"], "--query", imgs["b"]], ["gone.png"]),
        "non-image": (ck + ex + ["--query", str(t / "notimg.png")], ["notimg.png"]),
        "empty file": (ck + ["--exemplar", imgs["a"], str(t / "empty.png"), "--query", imgs["b"]], ["empty.png", "empty"]),
        "bad json line": (ck + ["--manifest", str(t / "badjson.jsonl")], ["badjson.jsonl:2", "JSON"]),
        "missing key": (ck + ["--manifest", str(t / "nokey.jsonl")], ["nokey.jsonl:1", "query"]),
        "not an object": (ck + ["--manifest", str(t / "notobj.jsonl")], ["notobj.jsonl:1"]),
        "missing manifest": (ck + ["--manifest", str(t / "nomanifest.jsonl")], ["nomanifest.jsonl"]),
        "path in name": (ck + ["--manifest", str(t / "badname.jsonl")], ["badname.jsonl:1", "'../escape'", "plain file name"]),
        "seeds 0": (ck + ex + ["--query", imgs["b"], "--seeds", "0"], ["--seeds"]),
        "negative seed": (ck + ex + ["--query", imgs["b"], "--seed", "-1"], ["--seed"]),
        "keep > seeds": (ck + ex + ["--query", imgs["b"], "--seeds", "2", "--keep", "3"], ["--keep", "3"]),
        "score steps > steps": (ck + ex + ["--query", imgs["b"], "--steps", "2", "--score-steps", "3"], ["--score-steps"]),
        "unknown scorer": (ck + ex + ["--query", imgs["b"], "--scorer", "best"], ["--scorer", "'best'", "consensus"]),
        "ensemble of one": (ck + ex + ["--query", imgs["b"], "--ensemble", "median", "--keep", "1"], ["ensemble", "--keep"]),
        "manifest and query": (ck + ["--manifest", str(t / "nokey.jsonl"), "--query", imgs["b"]], ["--manifest"]),
        "no query": (ck + ex, ["--query"]),
        "not a checkpoint": (["--checkpoint", str(t / "not_pico")] + ex + ["--query", imgs["b"]], ["not_pico", "pico"]),
        "bad mesh": (ck + ex + ["--query", imgs["b"], "--mesh", "dp=2"], ["--mesh", "'dp=2'"]),
        "mesh too big": (ck + ex + ["--query", imgs["b"], "--mesh", "data=3"], ["data", "does not divide"]),
        "batch vs mesh": (ck + ex + ["--query", imgs["b"], "--mesh", "data=8", "--batch-size", "4"],
                          ["--batch-size 4", "data x fsdp = 8", "--mesh data=8"]),
        "profile to a file": (ck + ex + ["--query", imgs["b"], "--profile", imgs["a"]], ["--profile", "a.png", "a file"]),
    }


CASES = ["missing image", "missing exemplar", "non-image", "empty file", "bad json line", "missing key",
         "not an object", "missing manifest", "path in name", "seeds 0", "negative seed", "keep > seeds", "score steps > steps", "unknown scorer",
         "ensemble of one",
         "manifest and query", "no query", "not a checkpoint", "bad mesh", "mesh too big", "batch vs mesh",
         "profile to a file"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exit_code_2_names_the_culprit(case, tmp_path, imgs, checkpoint, capsys):
    argv, needles = _bad_inputs(tmp_path, imgs, checkpoint)[case]
    out = tmp_path / "out"
    rc = main(argv + ["--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "error" in err and "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    assert _files(out) == []  # nothing written


def test_unreadable_second_query_in_a_batch_leaves_nothing(tmp_path, imgs, checkpoint, capsys):
    """A truncated file passes the header check; it fails when the batch is loaded, before any
    sampling, so with both queries in one batch nothing at all is written."""
    good = open(imgs["b"], "rb").read()
    trunc = tmp_path / "in" / "trunc.png"
    trunc.write_bytes(good[: len(good) // 2])
    out = tmp_path / "out"
    rc = main(["--checkpoint", checkpoint, "--exemplar", imgs["a"], imgs["a_out"], "--query", imgs["b"],
               "--query", str(trunc), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "trunc.png" in err, err
    assert _files(out) == []


def test_unreadable_query_in_a_later_batch_keeps_only_complete_results(tmp_path, imgs, checkpoint, capsys):
    good = open(imgs["b"], "rb").read()
    trunc = tmp_path / "in" / "trunc.png"
    trunc.write_bytes(good[: len(good) // 2])
    out = tmp_path / "out"
    rc = main(["--checkpoint", checkpoint, "--exemplar", imgs["a"], imgs["a_out"], "--query", imgs["b"],
               "--query", str(trunc), "--out", str(out), "--batch-size", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "trunc.png" in err, err
    assert _files(out) == ["b.png", "b_grid.png", "scores.json"]  # the finished query, complete
    assert _readable_png(out / "b.png") == (20, 12) and _readable_png(out / "b_grid.png") == (32, 32)
    assert list(json.loads((out / "scores.json").read_text())["queries"]) == ["b"]


def test_png_writer_failing_mid_run_leaves_no_partial_files(tmp_path, imgs, checkpoint, monkeypatch, capsys):
    """The 4th PNG write (the second query's grid) dies half-way through writing its data."""
    real_save = Image.Image.save
    calls = []

    def flaky_save(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 4:
            fp.write(b"\x89PNG\r\n\x1a\n half a png")
            raise OSError(28, "No space left on device")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", flaky_save)
    out = tmp_path / "out"
    rc = main(["--checkpoint", checkpoint, "--exemplar", imgs["a"], imgs["a_out"], "--query", imgs["b"],
               "--query", imgs["b2"], "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert len(calls) == 4
    assert rc == 1 and "b_1_grid.png" in err and "No space left" in err, err
    # The first query is complete; of the second, neither its (already written) B' nor the
    # half-written grid remains; no temp files; scores.json lists exactly the complete query.
    monkeypatch.setattr(Image.Image, "save", real_save)
    assert _files(out) == ["b.png", "b_grid.png", "scores.json"]
    assert _readable_png(out / "b.png") == (20, 12)
    assert list(json.loads((out / "scores.json").read_text())["queries"]) == ["b"]


def test_save_png_atomic_cleans_up_on_failure(tmp_path, monkeypatch):
    """The writer the CLI relies on: a failure mid-write leaves neither the target nor a temp."""
    def broken(self, fp, *a, **k):
        fp.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken)
    with pytest.raises(OSError):
        imageio.save_png_atomic(np.zeros((4, 4, 3), np.float32), tmp_path / "x.png")
    assert os.listdir(tmp_path) == []


def test_ensemble_flag_writes_the_median_of_the_kept_candidates(tmp_path, imgs, checkpoint, capsys):
    out = tmp_path / "out"
    rc = main(["--checkpoint", checkpoint, "--exemplar", imgs["a"], imgs["a_out"], "--query", imgs["b"], "--out", str(out),
               "--seeds", "3", "--keep", "3", "--ensemble", "median", "--save-candidates", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "scores.json").read_text())
    assert report["plan"]["ensemble"] == "median"
    q = report["queries"]["b"]
    assert sorted(q["ensembled_seeds"]) == q["seeds"]

    def rgb(name):
        with Image.open(out / name) as im:
            return np.asarray(im.convert("RGB")).astype(np.int16)

    cands = np.stack([rgb(f"b_cand{i}.png") for i in range(3)])
    panel = rgb("b_grid.png")[PANEL:, PANEL:]
    assert np.abs(panel - np.median(cands, 0)).max() <= 1  # the PNGs are each rounded to 8 bits
    assert np.abs(panel - cands[0]).max() > 1  # not just the best candidate


def test_an_ensembling_default_follows_the_flags_given(tmp_path, imgs, capsys):
    """A checkpoint whose default ensembles (the bundled pico-tiny's shape): --seeds 1 or --keep 1
    alone run one seed without an error about the default they did not set."""
    plan = SamplingPlan(steps=2, seeds=3, keep=2, selection="early", scorer=ScorerConfig(steps=1), ensemble="median")
    ck = str(save_pico(tmp_path / "ens", FluxTransformer(CFG, rngs=nnx.Rngs(0)), panel=PANEL,
                       autoencoder={"kind": "pixel", "factor": 2}, plan=plan))
    for flags, keep, ensemble in ([], 2, "median"), (["--seeds", "1"], 1, None), (["--keep", "1"], 1, None):
        out = tmp_path / f"out{len(flags)}{flags[:1]}"
        rc = main(["--checkpoint", ck, "--exemplar", imgs["a"], imgs["a_out"], "--query", imgs["b"],
                   "--out", str(out), "--no-progress", *flags])
        assert rc == 0, capsys.readouterr().err
        report = json.loads((out / "scores.json").read_text())
        assert (report["plan"]["keep"], report["plan"]["ensemble"]) == (keep, ensemble), flags
        assert ("ensembled_seeds" in report["queries"]["b"]) == (ensemble is not None)


def test_consensus_scorer_flag(tmp_path, imgs, checkpoint, capsys):
    out = tmp_path / "out"
    rc = main(["--checkpoint", checkpoint, "--exemplar", imgs["a"], imgs["a_out"], "--query", imgs["b"], "--out", str(out),
               "--seeds", "3", "--scorer", "consensus", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "scores.json").read_text())
    assert report["plan"]["scorer"]["signal"] == "consensus"
    q = report["queries"]["b"]
    assert all(s <= 0 for s in q["scores"]) and q["chosen_seed"] == q["seeds"][int(np.argmax(q["scores"]))]


def test_mesh_flag_paints_what_one_device_paints(tmp_path, imgs, checkpoint, capsys):
    """--mesh data=2,fsdp=2,tensor=2 --batch-size 4: two queries (padded to four), one per data x fsdp
    device, one head per tensor device; the same PNGs and seeds as one device at batch size 2, with
    the weights gathered once per batch (--gather-weights auto, the default, where that fits: here it
    does, and the run says so) or per layer (--gather-weights per_layer)."""
    runs, stdout = {}, {}
    mesh = ["--mesh", "data=2,fsdp=2,tensor=2", "--batch-size", "4"]
    for name, extra in (("one", ["--batch-size", "2"]), ("auto", mesh), ("per_layer", [*mesh, "--gather-weights", "per_layer"])):
        out = tmp_path / name
        rc = main(["--checkpoint", checkpoint, "--exemplar", imgs["a"], imgs["a_out"], "--query", imgs["b"],
                   "--query", imgs["b2"], "--out", str(out), "--no-progress", *extra])
        captured = capsys.readouterr()
        assert rc == 0, captured.err
        runs[name], stdout[name] = out, captured.out
    report = lambda k: json.loads((runs[k] / "scores.json").read_text())
    assert report("auto")["gather_weights_run"] == "per_call"
    assert re.search(r"weights gathered once per batch \([0-9.]+ GiB planned per device\)", stdout["auto"])
    assert "gather_weights_run" not in report("per_layer") and "gathered" not in stdout["per_layer"]
    chosen = lambda k: {q: v["chosen_seed"] for q, v in report(k)["queries"].items()}
    for other in ("auto", "per_layer"):
        assert _files(runs["one"]) == _files(runs[other])
        for f in _files(runs["one"]):
            if f.endswith(".png"):
                a, b = (np.asarray(Image.open(runs[k] / f), np.int16) for k in ("one", other))
                assert np.abs(a - b).max() <= 1, (other, f)  # float results equal to ~1e-6; 8-bit rounding may differ by one
        assert chosen("one") == chosen(other)


def test_mesh_run_writes_only_from_the_first_process(tmp_path, imgs, checkpoint, monkeypatch, capsys):
    """On a cluster every host runs the same command; the hosts after the first compute their share
    and write nothing (a second process is simulated by its index)."""
    import jax

    monkeypatch.setattr(jax, "process_index", lambda *a: 1)
    out = tmp_path / "out"
    rc = main(["--checkpoint", checkpoint, "--exemplar", imgs["a"], imgs["a_out"], "--query", imgs["b"],
               "--out", str(out), "--batch-size", "4", "--mesh", "data=2,fsdp=2,tensor=2", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert not out.exists()

