"""pbrf_fast.paper.recipes: one row per setting, and every job builds its setting from it."""
import dataclasses

import pytest
import torch

from pbrf_fast.paper.config import EvaluateConfig
from pbrf_fast.paper.evaluate_job import EVALUATE_SETTINGS, build_setting
from pbrf_fast.paper.experiments import DATASETS, PRESETS, build, recipe_model
from pbrf_fast.paper.recipes import RECIPES, SCORES_DATASETS, SCORES_MODELS, recipe


def test_every_experiment_has_a_row_at_both_presets():
    for dataset in DATASETS:
        models = ("auto", "autoencoder", "lenet", "alexnet", "vgg13", "resnet20") if "mnist" in dataset else ("auto",)
        for model in models + (("lenet", "alexnet", "vgg13") if dataset == "cifar10" else ()):
            for preset in PRESETS:
                row = recipe("experiment", dataset, recipe_model(dataset, model), preset)
                assert row.train.epochs >= 0 and (row.model == "logreg") == (row.lissa_depth is None)


def test_evaluate_and_scores_settings_are_the_tables_rows():
    assert EVALUATE_SETTINGS == {(d, m) for j, d, m, _ in RECIPES if j == "evaluate"}
    assert ("cifar10", "resnet20") in EVALUATE_SETTINGS
    scores = {(d, m) for j, d, m, _ in RECIPES if j == "scores"}
    assert scores == {("cifar10", "resnet20")} | {(d, "mlp") for d in SCORES_DATASETS}
    assert {m for _, m in scores} == set(SCORES_MODELS)


def test_an_unknown_setting_names_the_jobs_settings():
    with pytest.raises(ValueError, match="no scores recipe for dataset 'digits', model 'resnet20'"):
        recipe("scores", "digits", "resnet20")


def test_the_experiment_is_built_by_its_row():
    row = recipe("experiment", "digits", "mlp", "quick")
    exp = build("digits", "quick")
    assert exp.train == row.train.config(0)
    assert [m.out_features for m in exp.problem.model if isinstance(m, torch.nn.Linear)] == [row.width] * 2 + [10]
    assert exp.responses.influence_options["depth"] == row.lissa_depth
    # overrides replace the row's values, and LiSSA's scale follows the new training
    longer = build("digits", "quick", epochs=3, width=8)
    assert longer.train.epochs == 3 and longer.problem.model[0].out_features == 8


def test_the_evaluate_setting_is_built_by_its_row():
    row = recipe("evaluate", "digits", "mlp")
    setting = build_setting(EvaluateConfig(dataset="digits", model="mlp"))
    assert len(setting.x) == row.data.train_points and setting.weight_decay == row.train.weight_decay
    assert dataclasses.asdict(setting.train) == dataclasses.asdict(row.train.config(0))
    assert setting.make_model(0)[0].out_features == row.max_width   # --width 128 capped at the row's 64
    logreg = build_setting(EvaluateConfig(dataset="digits", model="logreg"))
    assert logreg.train.optimizer == "lbfgs" and logreg.make_model(0).weight.dtype == torch.float64
    assert logreg.make_model(0).out_features == 10


def test_rows_keep_the_papers_settings():
    # Appendix E.3: CIFAR-10's learning rate divided by 5 at epochs 60, 120, 160 at the paper preset only
    paper = recipe("experiment", "cifar10", "resnet20", "paper").train
    assert (paper.lr_milestones, paper.lr_gamma, paper.epochs) == ((60, 120, 160), 0.2, 200)
    assert recipe("experiment", "cifar10", "resnet20", "quick").train.lr_milestones == ()
    resnet = recipe("evaluate", "cifar10", "resnet20")
    assert (resnet.train.lr, resnet.train.batch_size, resnet.train.epochs, resnet.data.calibration_points) == (
        0.05, 32, 8, 512)
    net = recipe("scores", "synthetic", "mlp").build_model((12,), 4, seed=0)
    assert [m.out_features for m in net if isinstance(m, torch.nn.Linear)] == [64, 64, 4]
