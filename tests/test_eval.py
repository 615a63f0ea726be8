"""The evaluation harness (pico_jax.eval): metric definitions on hand-made cases, the oracle
threshold, bootstrap and win rates, and evaluate() / the CLI end to end on a random tiny pico
checkpoint (2 families: one mask, one image; 2 episodes; 2 seeds)."""

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from pico_jax import eval as ev
from pico_jax.checkpoints import load_pico, save_pico
from pico_jax.data.relations import EVAL_SEED_START, eval_seed, mask_from_output, render_mask, sample_episode
from pico_jax.model.flux import FluxConfig, FluxTransformer

PANEL, AE = 16, 2
CFG = FluxConfig(num_double=1, num_single=1, num_heads=2, head_dim=16, axes_dims_rope=(4, 6, 6), in_channels=112,
                 out_channels=48, context_dim=16, pooled_dim=16, guidance_embeds=False)
FAMS = {"segment_color": "mask", "denoise": "image"}
EPISODES, SEEDS = 2, 4  # 4 seeds: ensemble_early (the best 2 by the early scores) differs from ensemble_full


# ------------------------------------------------------------------------------ metrics
def test_iou_on_known_masks():
    p = np.zeros((4, 4), bool)
    t = np.zeros((4, 4), bool)
    p[:2, :2] = True  # 4 px
    t[:2, 1:3] = True  # 4 px, 2 shared
    assert ev.iou(p, t) == pytest.approx(2 / 6)
    assert ev.iou(p, p) == 1.0
    assert ev.iou(np.zeros((4, 4), bool), np.zeros((4, 4), bool)) == 1.0  # both empty: defined as 1
    assert ev.iou(np.zeros((4, 4), bool), t) == 0.0
    # Through rendered mask outputs of different colours (max channel > 0.5).
    m = ev.metrics_for("mask", render_mask(p, "red"), render_mask(t, "cyan"))
    assert m == {"iou": pytest.approx(2 / 6), "score": pytest.approx(2 / 6)}


def test_psnr_l1_ssim_on_known_errors():
    rng = np.random.default_rng(0)
    truth = np.full((8, 8, 3), 0.5, np.float32)
    pred = truth + 0.1  # MSE 0.01 -> 20 dB
    assert ev.psnr(pred, truth) == pytest.approx(20.0, abs=1e-5)
    assert ev.l1(pred, truth) == pytest.approx(0.1, abs=1e-6)
    assert ev.psnr(truth, truth) == ev.PSNR_CAP
    # Both images are clipped to [0, 1] first.
    assert ev.psnr(np.full((4, 4, 3), 1.5), np.ones((4, 4, 3))) == ev.PSNR_CAP
    img = rng.random((20, 20, 3))
    assert ev.ssim(img, img) == pytest.approx(1.0)
    noisy = np.clip(img + rng.normal(0, 0.2, img.shape), 0, 1)
    s = ev.ssim(noisy, img)
    assert 0.0 < s < 0.95
    # On interior pixels the SSIM map equals scikit-image's Gaussian SSIM (which crops borders).
    from skimage.metrics import structural_similarity

    ref = structural_similarity(noisy, img, data_range=1.0, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False)
    assert ev.ssim_map(noisy, img)[5:-5, 5:-5].mean() == pytest.approx(ref, abs=1e-6)
    m = ev.metrics_for("image", pred, truth)
    assert set(m) == {"psnr", "ssim", "l1", "score"} and m["score"] == m["psnr"]


def test_threshold_oracle_is_the_best_global_threshold():
    rng = np.random.default_rng(1)
    img = rng.random((12, 12, 3)).astype(np.float32)
    lum = ev.luminance(img)
    bright = lum > 0.6
    mask, thr, pol, score = ev.threshold_oracle(img, bright)
    assert score == 1.0 and pol == "above" and np.array_equal(mask, bright) and np.array_equal(lum > thr, bright)
    dark = lum < 0.3
    mask, thr, pol, score = ev.threshold_oracle(img, dark)
    assert score == 1.0 and pol == "below" and np.array_equal(lum < thr, dark)
    # An arbitrary truth: equals brute force over every threshold and both polarities.
    truth = rng.random((12, 12)) > 0.7
    mask, thr, pol, score = ev.threshold_oracle(img, truth)
    cuts = np.concatenate([[-1.0, 2.0], np.unique(lum)])
    brute = max(max(ev.iou(lum >= c, truth), ev.iou(lum <= c, truth)) for c in cuts)
    assert score == pytest.approx(brute) and ev.iou(mask, truth) == pytest.approx(score)
    # Empty truth: the empty mask (IoU 1).
    assert ev.threshold_oracle(img, np.zeros((12, 12), bool))[3] == 1.0


def test_bootstrap_and_win_rate():
    c = ev.bootstrap_mean_ci([[0.3, 0.3, 0.3], [0.3]], n_boot=500)
    assert c["mean"] == pytest.approx(0.3) and c["ci_low"] <= c["mean"] <= c["ci_high"]
    assert c["ci_high"] - c["ci_low"] < 1e-12
    rng = np.random.default_rng(2)
    g = [rng.normal(1.0, 1.0, 50), rng.normal(-1.0, 1.0, 30)]
    c = ev.bootstrap_mean_ci(g, n_boot=2000, seed=3)
    assert c == ev.bootstrap_mean_ci(g, n_boot=2000, seed=3)  # fixed RNG
    se = np.concatenate(g).std() / np.sqrt(80)
    assert c["ci_low"] < c["mean"] < c["ci_high"] and 1.5 * se < c["ci_high"] - c["ci_low"] < 6 * se
    w = ev.win_rate([1.0, 2.0, 3.0], [0.0, 2.0, 4.0])
    assert (w["wins"], w["ties"], w["losses"], w["win_rate"]) == (1, 1, 1, 0.5)
    # The random-seed baseline's index: fixed per (family, episode), uniform over the candidates.
    assert ev._random_index("denoise", 5, 8, 0) == ev._random_index("denoise", 5, 8, 0)
    counts = np.bincount([ev._random_index("denoise", i, 4, 0) for i in range(4000)], minlength=4)
    assert np.all(np.abs(counts - 1000) < 120)


# ------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = FluxTransformer(CFG, rngs=nnx.Rngs(0))
    return save_pico(tmp_path_factory.mktemp("eval") / "ck", model, panel=PANEL,
                     autoencoder={"kind": "pixel", "factor": AE})


@pytest.fixture(scope="module")
def evaluated(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_out")
    pipe = load_pico(checkpoint, batch_size=2)
    res = ev.evaluate(pipe, list(FAMS), EPISODES, SEEDS, steps=2, score_steps=1, out_dir=out, n_boot=1000,
                      sheet_episodes=2, progress=False)
    return res, out


def test_results_json_has_every_method_and_metric(evaluated):
    res, out = evaluated
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == res
    st = res["settings"]
    assert st["episodes"] == EPISODES and st["seeds"] == SEEDS and st["episode_size"] == PANEL
    assert st["plan_early"]["selection"] == "early" and st["plan_early"]["keep"] == 1
    assert st["plan_full"]["selection"] == "full" and st["plan_full"]["keep"] == SEEDS
    assert st["plan_full"]["steps"] == 2 and st["plan_early"]["scorer"]["steps"] == 1
    assert st["split"] == "train"
    for fam, kind in FAMS.items():
        f = res["families"][fam]
        assert f["kind"] == kind and len(f["episodes"]) == EPISODES
        methods = set(ev.METHODS) if kind == "mask" else set(ev.METHODS) - {"threshold_B"}
        metrics = {"iou", "score"} if kind == "mask" else {"psnr", "ssim", "l1", "score"}
        for e in f["episodes"]:
            assert e["seed"] >= EVAL_SEED_START  # evaluation seeds only
            assert set(e["metrics"]) == methods
            for m in methods:
                assert set(e["metrics"][m]) == metrics
                assert all(isinstance(v, float) for v in e["metrics"][m].values())
            assert len(e["candidates"]) == SEEDS and e["seeds"] == list(range(SEEDS))
        s = res["summary"]["families"][fam]
        assert set(s["score"]) == methods and s["best_baseline"]["method"] in ev.BASELINES
    assert set(res["summary"]["groups"]) == {"overall/mask", "overall/image", "semantic/mask", "restoration/image"}


def test_baselines_equal_direct_computation(evaluated):
    res, _ = evaluated
    for fam, kind in FAMS.items():
        for i, e in enumerate(res["families"][fam]["episodes"]):
            ep = sample_episode(fam, eval_seed(i), PANEL)
            assert e["seed"] == eval_seed(i)
            assert e["metrics"]["copy_B"] == ev.metrics_for(kind, ep.B, ep.B_out)
            assert e["metrics"]["analogy"] == ev.metrics_for(kind, np.clip(ep.B + (ep.A_out - ep.A), 0, 1), ep.B_out)
            if kind == "mask":
                truth = mask_from_output(ep.B_out)
                assert e["metrics"]["copy_B"]["iou"] == ev.iou(mask_from_output(ep.B), truth)
                assert e["metrics"]["threshold_B"]["iou"] == ev.threshold_oracle(ep.B, truth)[3]
            else:
                assert e["metrics"]["copy_B"]["psnr"] == ev.psnr(ep.B, ep.B_out)


def test_selection_methods_are_consistent_with_the_candidates(evaluated):
    res, _ = evaluated
    # The early run's chosen seed finishes on the same trajectory as in the full run.
    assert res["settings"]["early_vs_full_same_seed_max_abs_diff"] < 1e-4
    for fam in FAMS:
        for e in res["families"][fam]["episodes"]:
            cand = {c["seed"]: c for c in e["candidates"]}
            scores = [c["metrics"]["score"] for c in e["candidates"]]
            ch = e["chosen"]
            assert e["metrics"]["oracle"]["score"] >= max(scores) - 1e-12  # the oracle is >= every candidate
            assert e["metrics"]["oracle"] == cand[ch["oracle"]]["metrics"]
            assert e["metrics"]["random_seed"] == cand[ch["random_seed"]]["metrics"]
            assert e["metrics"]["ours_full"] == cand[ch["ours_full"]]["metrics"]
            assert ch["ours_full"] == e["seeds"][int(np.argmax(e["scores_full"]))]
            assert ch["ours_early"] == e["seeds"][int(np.argmax(e["scores_early"]))]
            for k, v in e["metrics"]["ours_early"].items():
                assert v == pytest.approx(cand[ch["ours_early"]]["metrics"][k], abs=1e-3)
            assert [c["score"] for c in e["candidates"]] == e["scores_full"]


def test_ensemble_rows_are_the_median_of_the_documented_seeds(checkpoint, evaluated):
    """ensemble_early is what the early plan with keep=K and ensemble="median" returns (checked by
    running that plan), and ensemble_full the median of all N full-run candidates."""
    import dataclasses

    from pico_jax import grid

    res, _ = evaluated
    st = res["settings"]
    assert st["ensemble"] == {"how": "median", "early_keep": SEEDS // 2}
    assert st["model_calls_per_episode"]["ensemble_early"] == SEEDS * 1 + (SEEDS // 2) * (2 - 1)
    pipe = load_pico(checkpoint, batch_size=2)
    early, full = ev._plans(pipe, SEEDS, 2, 1)
    plan_e = dataclasses.replace(early, keep=SEEDS // 2, ensemble="median")
    plan_f = dataclasses.replace(full, ensemble="median")
    differs = 0
    for fam, kind in FAMS.items():
        for i, e in enumerate(res["families"][fam]["episodes"]):
            top = np.argsort(-np.asarray(e["scores_early"], np.float32), kind="stable")[:SEEDS // 2]
            assert e["ensemble_early_seeds"] == [e["seeds"][int(t)] for t in top]
            ep = sample_episode(fam, eval_seed(i), PANEL)
            cv = grid.compose(ep.A, ep.A_out, ep.B, panel=PANEL, policy=pipe.policy, multiple=2 * AE)
            for row, plan in (("ensemble_early", plan_e), ("ensemble_full", plan_f)):
                r = pipe.run_canvases([cv], plan)[0]
                got = ev.metrics_for(kind, np.clip(r.image, 0, 1), ep.B_out)
                for k, v in e["metrics"][row].items():
                    assert v == pytest.approx(got[k], abs=1e-3), (fam, i, row, k)
            differs += e["metrics"]["ensemble_early"] != e["metrics"]["ensemble_full"]
    assert differs > 0  # the two rows are different predictions
    g = res["summary"]["groups"]["overall/image"]
    c = g["ensemble_early_minus_early"]
    assert c["ci_low"] <= c["mean"] <= c["ci_high"]
    assert set(res["summary"]["beats_best_baseline"]) == set(ev.OURS)


def test_summary_statistics(evaluated):
    res, _ = evaluated
    summ = res["summary"]
    cis = [p["early_minus_random"] for p in summ["families"].values()]
    cis += [g[k] for g in summ["groups"].values() for k in ("early_minus_random", "early_minus_full", "full_minus_random")]
    for c in cis:
        assert c["ci_low"] <= c["mean"] <= c["ci_high"]
    for fam in FAMS:
        eps = res["families"][fam]["episodes"]
        p = summ["families"][fam]
        for m, v in p["score"].items():
            assert v == pytest.approx(np.mean([e["metrics"][m]["score"] for e in eps]))
        d = [e["metrics"]["ours_early"]["score"] - e["metrics"]["random_seed"]["score"] for e in eps]
        assert p["early_minus_random"]["mean"] == pytest.approx(np.mean(d))
        assert 0 <= p["win_rates"]["early_vs_random"]["win_rate"] <= 1
        base = {m: p["score"][m] for m in ev.BASELINES if m in p["score"]}
        assert p["best_baseline"]["score"] == max(base.values())
    b = summ["beats_best_baseline"]["ours_early"]
    assert b["of"] == 2 and 0 <= b["count"] <= 2


def test_markdown_and_sheet(evaluated):
    res, out = evaluated
    md = (out / "results.md").read_text()
    for s in ("segment_color", "denoise", "| family |", "ours_early", "threshold_B", "best baseline",
              "beats the best no-learning baseline on", "early − random", "early − full", "**semantic**",
              "ensemble_early", "ensemble (early) beats", "ensemble (early) − early", "per-pixel median of the 2 seeds"):
        assert s in md, s
    sheet = np.asarray(Image.open(out / "sheet_train.png"))
    rows = 2 * len(FAMS)
    cell = PANEL * 6  # 16-px panels upscaled to >= 96 px
    assert sheet.shape == (20 + rows * (cell + 4) + 4, 170 + 6 * (cell + 4) + 4, 3)
    assert not [p for p in os.listdir(out) if p.startswith(".")]  # no temp files left


def test_cli_end_to_end(checkpoint, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "pico_jax.eval", "--checkpoint", str(checkpoint), "--families",
           ",".join(FAMS), "--episodes", "1", "--seeds", "2", "--steps", "2", "--out", str(out),
           "--no-progress", "--bootstrap", "200"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["checkpoint"] == str(checkpoint) and res["settings"]["plan_full"]["steps"] == 2
    from pico_jax.checkpoints import checkpoint_fingerprint

    assert res["settings"]["checkpoint_sha256"] == checkpoint_fingerprint(checkpoint)
    assert all(len(f["episodes"]) == 1 for f in res["families"].values())
    assert (out / "results.md").exists() and (out / "sheet_train.png").exists()


def test_cli_errors(checkpoint, tmp_path, capsys):
    assert ev.main(["--families", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown families" in capsys.readouterr().err
    assert ev.main(["--checkpoint", str(checkpoint), "--families", "denoise", "--steps", "2", "--score-steps", "3",
                    "--out", str(tmp_path)]) == 2
    assert "score-steps" in capsys.readouterr().err
    assert ev.main(["--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert ev.main(["--episodes", "0", "--out", str(tmp_path)]) == 2
    assert ev.main(["--checkpoint", str(checkpoint), "--mesh", "data=8", "--batch-size", "4", "--out", str(tmp_path)]) == 2
    assert "--batch-size 4 must be a multiple of the mesh's data x fsdp = 8" in capsys.readouterr().err


def _numbers(tree, path=""):
    """{path: number} of every number in a JSON-like tree."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _numbers(sub, f"{path}/{key}").items()}
    if isinstance(tree, list):
        return {k: v for i, sub in enumerate(tree) for k, v in _numbers(sub, f"{path}[{i}]").items()}
    return {path: float(tree)} if isinstance(tree, (int, float)) and not isinstance(tree, bool) else {}


def test_evaluation_on_a_mesh_matches_one_device(checkpoint, evaluated, tmp_path):
    from pico_jax.parallel import make_mesh

    res, _ = evaluated
    pipe = load_pico(checkpoint, batch_size=4, mesh=make_mesh("data=2,fsdp=2,tensor=2"))
    got = ev.evaluate(pipe, list(FAMS), EPISODES, SEEDS, steps=2, score_steps=1, out_dir=tmp_path, n_boot=1000,
                      sheet_episodes=2, progress=False)
    want, have = _numbers(res["families"]), _numbers(got["families"])
    assert want.keys() == have.keys() and len(want) > 50
    # the default gather_weights="auto" over fsdp: the whole model once per call, which fits here
    assert res["settings"]["sampler_fitted"] == {}  # one device: nothing was left to the memory
    for name in ("plan_early", "plan_full"):
        fitted = got["settings"]["sampler_fitted"][name]
        assert fitted["gather_weights"] == "per_call" and fitted["chosen_by_memory"] == ["gather_weights"]
        assert [p["gather_weights"] for p in fitted["plans_gib"]] == ["per_call"] and fitted["plans_gib"][0]["planned"] > 0
    for k in want:  # per-episode metrics and chosen seeds: equal up to float noise
        assert have[k] == pytest.approx(want[k], rel=1e-4, abs=1e-5), k


def _split_in_two(res):
    """Two results of the same evaluation: episodes [0, 1) and [1, EPISODES) of every family."""
    parts = []
    for lo, hi in ((0, 1), (1, None)):
        part = copy.deepcopy(res)
        for fam in part["families"].values():
            fam["episodes"] = fam["episodes"][lo:hi]
        part["settings"]["episode_seeds"] = f"episodes [{lo}, {hi})"
        part["summary"] = ev.summarize(part["families"], n_boot=1000)
        parts.append(part)
    return parts


def test_merge_of_a_split_evaluation_is_the_evaluation(evaluated):
    res, _ = evaluated
    a, b = _split_in_two(res)
    merged = ev.merge_results([b, a], names=["b.json", "a.json"], n_boot=1000)  # order does not matter
    assert merged["summary"] == ev._jsonable(res["summary"])
    assert merged["settings"]["episodes"] == EPISODES and merged["settings"]["merged_from"] == ["b.json", "a.json"]
    b["settings"]["sampler_fitted"] = {"plan_early": {"gather_weights": "per_call"}}  # what one part's memory chose
    merged = ev.merge_results([b, a], names=["b.json", "a.json"], n_boot=100)
    assert merged["settings"]["sampler_fitted"] == {"b.json": {"plan_early": {"gather_weights": "per_call"}}, "a.json": {}}
    for fam in merged["families"].values():
        assert [e["index"] for e in fam["episodes"]] == list(range(EPISODES))


def test_merge_errors_name_the_part_and_key(evaluated):
    res, _ = evaluated
    a, b = _split_in_two(res)
    with pytest.raises(ValueError, match=r"b.json: family '\w+' episode 0 is also in a.json"):
        ev.merge_results([a, a], names=["a.json", "b.json"])
    other = copy.deepcopy(b)
    other["settings"]["plan_full"]["steps"] = 99
    with pytest.raises(ValueError, match=r"b.json: settings\['plan_full'\]"):
        ev.merge_results([a, other], names=["a.json", "b.json"])
    other = copy.deepcopy(b)
    other["settings"]["plan_early"]["seed_batch"] = 3  # changes speed only: still poolable
    ev.merge_results([a, other], n_boot=100)
    with pytest.raises(ValueError, match="at least two"):
        ev.merge_results([a])


def test_merge_knows_a_checkpoint_by_its_content(evaluated):
    res, _ = evaluated
    a, b = (copy.deepcopy(p) for p in _split_in_two(res))
    a["settings"].update(checkpoint="/machine1/ckpt", checkpoint_sha256="ab" * 32)
    b["settings"].update(checkpoint="/machine2/copy", checkpoint_sha256="ab" * 32)
    ev.merge_results([a, b], n_boot=100)  # same weights at two paths: poolable
    b["settings"].update(checkpoint="/machine1/ckpt", checkpoint_sha256="cd" * 32)
    with pytest.raises(ValueError, match=r"b.json: settings\['checkpoint_sha256'\]"):
        ev.merge_results([a, b], names=["a.json", "b.json"])  # retrained at the same path: refused


def test_checkpoint_fingerprint_follows_content_not_path(tmp_path):
    import shutil

    from pico_jax.checkpoints import bundled_checkpoint, checkpoint_fingerprint
    from pico_jax.safetensors_io import CheckpointError

    copy_dir = tmp_path / "copy"
    shutil.copytree(bundled_checkpoint(), copy_dir)
    assert checkpoint_fingerprint(copy_dir) == checkpoint_fingerprint(None)
    weights = next(copy_dir.rglob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    assert checkpoint_fingerprint(copy_dir) != checkpoint_fingerprint(None)
    with pytest.raises(CheckpointError, match="missing"):
        checkpoint_fingerprint(tmp_path / "missing")


def test_cli_merge(evaluated, tmp_path, capsys):
    res, _ = evaluated
    paths = []
    for i, part in enumerate(_split_in_two(res)):
        paths.append(tmp_path / f"part{i}.json")
        paths[-1].write_text(json.dumps(part))
    out = tmp_path / "merged"
    assert ev.main(["--merge", *map(str, paths), "--out", str(out), "--bootstrap", "1000"]) == 0
    assert f"({EPISODES} episodes per family)" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["summary"] == ev._jsonable(res["summary"])
    assert "episodes [0, 1); episodes [1, None)" in (out / "results.md").read_text()
    (tmp_path / "bad.json").write_text("{not json")
    assert ev.main(["--merge", str(paths[0]), str(tmp_path / "bad.json"), "--out", str(tmp_path / "x")]) == 2
    assert "bad.json" in capsys.readouterr().err and not (tmp_path / "x").exists()
