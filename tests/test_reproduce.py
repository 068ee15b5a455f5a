"""The experiment options the reproduction's rows run with: cold start with a fresh batch order
(Table 5's fresh-order rows) and ``--device`` (a bad one fails before any work; the CPU is left
as it was). The rows themselves: test_reproduce_rows, _runner, _report."""
import pytest
import torch

from pbrf_fast import cli
from pbrf_fast.paper.config import ExperimentConfig
from pbrf_fast.paper.responses import ResponseSettings, ResponseSolver
from pbrf_fast.paper.training import batch_order, train, TrainConfig

from factories import make_problem, rel_err


def _trained():
    problem = make_problem("mse", 0.01, n=24, hidden=(6,))
    return problem, train(problem, TrainConfig(epochs=4, lr=0.05, batch_size=8, optimizer="momentum", seed=3))



def test_cold_start_with_a_fresh_batch_order():
    problem, base = _trained()
    replay = ResponseSolver(problem, base, ResponseSettings(epsilon=0.0, response_epochs=0))
    fresh = ResponseSolver(problem, base, ResponseSettings(epsilon=0.0, response_epochs=0, cold_start_order="fresh"))
    # the replayed order is the base run's; the fresh one is another permutation in every epoch
    assert replay.cold_start_config() == base.config
    config = fresh.cold_start_config()
    assert dataclasses_without_seed(config) == dataclasses_without_seed(base.config) and config.seed != base.config.seed
    for epoch in range(base.config.epochs):
        assert not torch.equal(batch_order(problem.n, config.seed, epoch), batch_order(problem.n, base.config.seed, epoch))
    # removing nothing: replaying the base run gives theta^s back exactly, a fresh order does not
    assert rel_err(replay.cold_start([0])[0], base.theta) < 1e-12
    assert rel_err(fresh.cold_start([0])[0], base.theta) > 1e-4
    # and the fresh run is itself the training run with that order (same start, same steps)
    again = train(problem, config, theta0=base.theta0).theta
    problem.set_theta(base.theta)
    assert rel_err(fresh.cold_start([0])[0], again) < 1e-12
    with pytest.raises(ValueError, match="cold_start_order"):
        ResponseSolver(problem, base, ResponseSettings(cold_start_order="shuffled")).cold_start([0])



def dataclasses_without_seed(config):
    import dataclasses

    return dataclasses.replace(config, seed=0)



def test_the_fresh_order_flag_reaches_the_responses_through_the_config():
    from pbrf_fast.paper.jobs import build_experiment

    exp = build_experiment(ExperimentConfig(dataset="cancer", cold_start_order="fresh"))
    assert exp.responses.cold_start_order == "fresh"
    assert build_experiment(ExperimentConfig(dataset="cancer")).responses.cold_start_order == "replay"
    with pytest.raises(ValueError, match="cold_start_order"):
        ExperimentConfig(cold_start_order="random")
    args = cli.build_parser().parse_args(["decompose", "--cold-start-order", "fresh"])
    assert cli._experiment_config(args).cold_start_order == "fresh"



@pytest.mark.parametrize("argv", [
    ["reproduce", "table5", "--row", "cancer"],
    ["decompose", "--dataset", "cancer"],
])
@pytest.mark.parametrize("device, message", [
    ("tpu:0", "--device must be"),
    ("not a device", "--device must be a torch device"),
    pytest.param("cuda", "no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_a_bad_device_exits_2_before_any_work(argv, device, message, capsys, tmp_path):
    assert cli.main(argv + ["--out", str(tmp_path), "--device", device, "--no-progress"]
                    if argv[0] == "reproduce" else argv + ["--out", str(tmp_path), "--device", device]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.rglob("base.pt"))



def test_the_device_option_moves_the_experiment_and_leaves_cpu_runs_as_they_were():
    from pbrf_fast.paper.experiments import to_device
    from pbrf_fast.paper.jobs import build_experiment, resolve_device

    config = ExperimentConfig(dataset="cancer")
    exp = build_experiment(config, device="cpu")
    assert to_device(exp, resolve_device("cpu")) is exp          # nothing copied on the CPU
    assert exp.problem.device == torch.device("cpu")

