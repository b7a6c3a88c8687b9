"""`gentrain eval`, `gentrain classifier`, evaluation during training, and `gentrain plot`, run through the CLI."""

import json
import re

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import FAST, assert_one_line_error, run_cli
from gentrain import data
from gentrain.metrics import classifier as metrics_classifier

GAN_KEYS = {"fid@classifier", "kid@classifier", "kid_std@classifier", "precision@classifier",
            "recall@classifier", "classes@classifier", "class_kl@classifier"}


@pytest.mark.parametrize("dataset,expected", [("mnist", 0.985), ("fashion_mnist", 0.90)])
def test_the_shipped_classifiers_reach_their_expected_test_accuracy(data_root, metrics_cache, dataset, expected):
    """The classifiers that ship with gentrain, scored again here on the whole test split."""
    _, classifier = metrics_cache
    cpu = torch.device("cpu")
    model, stored = metrics_classifier.load(metrics_classifier.SHIPPED / f"{dataset}-28px.pt", cpu)
    test = data.load(OmegaConf.create({"name": dataset, "root": str(data_root), "image_size": 28}), "test")
    accuracy = metrics_classifier.accuracy(model, test, cpu)
    assert accuracy >= expected and accuracy == pytest.approx(stored["test_accuracy"], abs=1e-4)
    assert classifier(dataset) == pytest.approx(accuracy, abs=1e-4)  # what `gentrain classifier` reports


@pytest.mark.slow
def test_gentrain_classifier_retrains_and_the_metrics_then_use_the_new_one(gentrain, tmp_path, runs):
    """One epoch of the classifier's recipe already reaches the shipped MNIST classifier's bar; a classifier
    trained into the cache is then the feature space that eval measures in."""
    cache = tmp_path / "cache"
    proc = gentrain("classifier", "dataset=mnist", "retrain=true", "epochs=1", "device=cpu", f"metrics.cache_dir={cache}")
    accuracy = float(re.search(r"test accuracy ([\d.]+)%", proc.stdout).group(1)) / 100
    assert accuracy >= 0.985 and str(cache / "classifier-mnist-28px.pt") in proc.stdout
    assert "classifier epoch 1/1: training accuracy" in proc.stderr  # its training shows how it goes
    out = tmp_path / "eval.json"
    gentrain("eval", f"ckpt={runs / 'gan'}", "n=100", "metrics=[fid]", f"metrics.cache_dir={cache}", f"out={out}")
    assert f"test accuracy {100 * accuracy:.2f}%" in json.loads(out.read_text())["spaces"]["classifier"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_root):
    """A GAN and a VAE trained for a few steps on MNIST."""
    root = tmp_path_factory.mktemp("runs")
    for family in ("gan", "vae"):
        run_cli([f"model={family}", "trainer.steps=6", *FAST, f"hydra.run.dir={root / family}"], root, data_root)
    return root


def evaluate(gentrain, metrics_cache, ckpt, *args, check=True):
    cache, classifier = metrics_cache
    classifier("mnist")
    return gentrain("eval", f"ckpt={ckpt}", "n=300", "device=cpu", f"metrics.cache_dir={cache}", *args, check=check)


def test_eval_writes_every_requested_key_and_repeats_exactly(gentrain, metrics_cache, runs, tmp_path):
    proc = evaluate(gentrain, metrics_cache, runs / "gan")
    result = json.loads((runs / "gan" / "checkpoints" / "eval.json").read_text())
    assert set(result["metrics"]) == GAN_KEYS
    assert result["skipped"] == {"nll": "needs a VAE", "modes": "needs a dataset of known modes (ring8, grid25, stacked_mnist)"}
    assert result["n"] == 300 and result["step"] == 6 and "test accuracy" in result["spaces"]["classifier"]
    assert "fid@classifier" in proc.stdout and "test accuracy" in proc.stdout  # the table names its space
    assert all(v >= 0 for k, v in result["metrics"].items() if not k.startswith("kid"))
    evaluate(gentrain, metrics_cache, runs / "gan", f"out={tmp_path / 'again.json'}")
    assert json.loads((tmp_path / "again.json").read_text())["metrics"] == result["metrics"]
    assert list(tmp_path.glob("*.log")) == []  # the verb logs to the console only, no eval.log where it ran
    evaluate(gentrain, metrics_cache, runs / "gan", "seed=1", f"out={tmp_path / 'seed1.json'}")
    assert json.loads((tmp_path / "seed1.json").read_text())["metrics"] != result["metrics"]


@pytest.mark.slow
def test_a_conditional_gan_learns_its_classes_without_dropping_z(gentrain, metrics_cache, tmp_path):
    """600 steps on MNIST: most samples are the class they were drawn for (class_acc), and within a class
    they still vary with z (recall well above 0; a G that ignores z scores 0 here)."""
    cache, classifier = metrics_cache
    classifier("mnist")
    run = tmp_path / "cond"
    gentrain("model.conditional=true", "trainer.steps=600", "trainer.batch_size=64", "model.ch=32",
             "trainer.log_every=600", "trainer.sample_every=600", "trainer.device=cpu", f"hydra.run.dir={run}")
    gentrain("eval", f"ckpt={run}", "n=1000", "device=cpu", f"metrics.cache_dir={cache}", "metrics=[classes,pr]")
    m = json.loads((run / "checkpoints" / "eval.json").read_text())["metrics"]
    assert {"classes@classifier", "class_kl@classifier", "class_acc@classifier"} <= set(m)
    assert m["class_acc@classifier"] > 0.5 and m["recall@classifier"] > 0.2, m


def test_eval_of_a_vae_reports_elbo_and_nll_in_nats_and_bits(gentrain, metrics_cache, runs, tmp_path):
    out = tmp_path / "vae.json"
    evaluate(gentrain, metrics_cache, runs / "vae", "metrics=[pr,nll]", "metrics.k=20", "metrics.nll_n=40",
             f"out={out}")
    result = json.loads(out.read_text())
    m = result["metrics"]
    assert set(m) == {"precision@classifier", "recall@classifier", "nelbo", "nll", "nelbo_bpd", "nll_bpd",
                      "rate_bits", "distortion"}
    assert 0 < m["nll"] <= m["nelbo"]  # the IWAE bound is tighter than the ELBO
    assert m["nll_bpd"] == pytest.approx(m["nll"] / (784 * 0.6931471805599453))
    assert result["nll_setup"]["k"] == 20 and result["nll_setup"]["test_images"] == 40
    assert result["nll_setup"]["likelihood"] == "bernoulli" and "not a normalised likelihood" in \
        result["nll_setup"]["meaning"]


def test_real_data_floor(gentrain, metrics_cache, tmp_path):
    cache, classifier = metrics_cache
    classifier("mnist")
    out = tmp_path / "floor.json"
    gentrain("eval", "dataset=mnist", "n=2000", "metrics=[fid,pr,classes]", f"metrics.cache_dir={cache}", f"out={out}")
    m = json.loads(out.read_text())["metrics"]
    assert m["fid@classifier"] < 5 and m["precision@classifier"] > 0.7 and m["classes@classifier"] == 10


@pytest.mark.slow
def test_inception_offline_without_weights_is_one_line(gentrain, metrics_cache, runs, tmp_path):
    env = {"TORCH_HOME": str(tmp_path / "torch-home"), "HTTPS_PROXY": "http://127.0.0.1:9",
           "https_proxy": "http://127.0.0.1:9"}
    proc = gentrain("eval", f"ckpt={runs / 'gan'}", "metrics.features=inception", check=False, env=env)
    line = assert_one_line_error(proc, "InceptionV3 weights", "metrics.inception_weights=PATH")
    assert str(tmp_path / "torch-home") in line  # says where to put the file


@pytest.fixture(scope="module")
def fake_inception(tmp_path_factory):
    """An InceptionV3 weights file with random weights, standing in for the real (downloaded) one."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: None)
        mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    weights = tmp_path_factory.mktemp("inception") / "inception.pt"
    torch.save(torch.nn.Module.state_dict(net), weights)
    return weights


@pytest.mark.slow
def test_inception_features_from_a_local_weights_file(gentrain, metrics_cache, runs, tmp_path, fake_inception):
    out = tmp_path / "inception.json"
    evaluate(gentrain, metrics_cache, runs / "gan", "n=24", "metrics=[fid,kid,pr]", "metrics.features=inception",
             f"metrics.inception_weights={fake_inception}", "metrics.ref_n=24", "metrics.kid_subsets=3", f"out={out}")
    result = json.loads(out.read_text())
    assert set(result["metrics"]) == {"fid@inception", "kid@inception", "kid_std@inception",
                                      "precision@inception", "recall@inception"}
    assert "InceptionV3" in result["spaces"]["inception"]


@pytest.mark.slow
def test_image_folder_runs_are_scored_in_inception_space(gentrain, tmp_path, emoji_dir, fake_inception):
    gentrain("dataset=folder", f"dataset.root={emoji_dir}", "dataset.image_size=32", *FAST, "trainer.steps=2",
             "hydra.run.dir=run")
    home = {"HOME": str(tmp_path / "home")}
    gentrain("eval", "ckpt=run", "n=16", "metrics=[fid,classes]", f"metrics.inception_weights={fake_inception}",
             "metrics.ref_n=16", env=home)
    result = json.loads((tmp_path / "run" / "checkpoints" / "eval.json").read_text())
    assert list(result["metrics"]) == ["fid@inception"] and "no labels" in result["skipped"]["classes"]
    cached = list((tmp_path / "home" / ".cache" / "gentrain" / "gentrain-cache").glob("reference-folder-*.pt"))
    assert len(cached) == 1 and not list(emoji_dir.glob("gentrain-cache"))  # never inside the user's folder


def test_eval_errors_are_one_line(gentrain, metrics_cache, runs, tmp_path):
    assert_one_line_error(gentrain("eval", check=False), "ckpt=PATH")
    assert_one_line_error(evaluate(gentrain, metrics_cache, runs / "gan", "metrics=[fid,bogus]", check=False),
                          "metrics.compute[1] must be one of fid|kid|pr|classes|nll|modes, got 'bogus'")
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert_one_line_error(gentrain("eval", f"ckpt={runs / 'gan'}", f"metrics.cache_dir={blocker}/cache",
                                   check=False), "metrics.cache_dir")
    assert_one_line_error(gentrain("eval", f"ckpt={tmp_path / 'missing.pt'}", check=False), "not found")
    assert_one_line_error(gentrain("eval", f"ckpt={runs / 'gan'}", "dataset=fashion_mnist", check=False),
                          "drop dataset=")
    assert_one_line_error(gentrain("eval", f"ckpt={runs / 'gan'}", "precision=fp64", check=False),
                          "precision must be one of auto|fp32|tf32|bf16|fp16, got 'fp64'")


def test_eval_draws_its_samples_in_the_precision_asked_for(gentrain, metrics_cache, runs, tmp_path):
    """precision=bf16 runs the generator under bf16 autocast (auto does on a GPU): the samples move by a
    few of bf16's roundings, and the scores with them."""
    from gentrain import checkpoint
    from gentrain.metrics.evaluator import draw

    model, _ = checkpoint.load_model(runs / "gan", torch.device("cpu"))
    fp32, _ = draw(model, 64, 0, torch.device("cpu"), batch_size=32)
    bf16, _ = draw(model, 64, 0, torch.device("cpu"), batch_size=32, amp=torch.bfloat16)
    assert fp32.dtype == bf16.dtype == torch.uint8
    assert 0 < (fp32.int() - bf16.int()).abs().max() <= 8
    evaluate(gentrain, metrics_cache, runs / "gan", "precision=bf16", "metrics=[fid]", f"out={tmp_path / 'bf16.json'}")
    evaluate(gentrain, metrics_cache, runs / "gan", "precision=fp32", "metrics=[fid]", f"out={tmp_path / 'fp32.json'}")
    scores = [json.loads((tmp_path / f"{p}.json").read_text())["metrics"]["fid@classifier"] for p in ("bf16", "fp32")]
    assert scores[0] != scores[1] and scores[0] == pytest.approx(scores[1], rel=0.05)


def test_training_evaluates_logs_and_keeps_the_best_checkpoint(gentrain, metrics_cache, tmp_path):
    cache, classifier = metrics_cache
    classifier("mnist")
    args = ["model=vae", *FAST, "trainer.eval_every=2", "trainer.eval_n=64", "trainer.eval_metric=nll",
            "metrics=[fid,nll]", "metrics.k=4", f"metrics.cache_dir={cache}", "hydra.run.dir=run"]
    gentrain(*args, "trainer.steps=4")
    lines = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in lines if "eval/nll" in r]
    assert [r["step"] for r in evals] == [2, 4] and all("eval/fid@classifier" in r for r in evals)
    best = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=True)
    nlls = {r["step"]: r["eval/nll"] for r in evals}
    assert best["best"]["metric"] == "nll" and best["best"]["value"] == min(nlls.values())
    assert best["step"] == min(nlls, key=nlls.get)
    # Resuming keeps the evaluations up to the checkpoint and adds the new ones once.
    gentrain("resume=run", "trainer.steps=6")
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if "eval/nll" in ln]
    assert steps == [2, 4, 6]


def test_eval_metric_must_be_computed(gentrain, tmp_path, metrics_cache):
    cache, _ = metrics_cache
    proc = gentrain("model=gan", *FAST, "trainer.steps=2", "trainer.eval_every=1", "trainer.eval_metric=nll",
                    f"metrics.cache_dir={cache}", "metrics=[fid]", check=False)
    assert_one_line_error(proc, "trainer.eval_metric=nll")


def test_plot_draws_the_run_curves(gentrain, runs, tmp_path):
    out = tmp_path / "curves.png"
    proc = gentrain("plot", runs / "vae", f"out={out}")
    assert str(out) in proc.stdout
    with Image.open(out) as img:
        assert img.width > 300 and img.height > 200
    gentrain("plot", runs / "gan")
    assert (runs / "gan" / "metrics.png").is_file()
    assert_one_line_error(gentrain("plot", tmp_path, check=False), "no metrics.jsonl")


def test_evaluating_during_training_changes_nothing_about_the_run(gentrain, tmp_path, metrics_cache):
    cache, classifier = metrics_cache
    classifier("mnist")
    common = ["model=gan", *FAST, "trainer.steps=4"]
    gentrain(*common, "hydra.run.dir=plain")
    gentrain(*common, "trainer.eval_every=1", "trainer.eval_n=32", "metrics=[fid,classes]",
             f"metrics.cache_dir={cache}", "hydra.run.dir=watched")
    plain, watched = (torch.load(tmp_path / run / "checkpoints" / "last.pt", weights_only=True)["model"]
                      for run in ("plain", "watched"))
    assert all(torch.equal(plain[k], watched[k]) for k in plain)
