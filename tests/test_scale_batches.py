"""Batches that are not (input, target) pairs through the scale pipeline (issue 31, item 4): a tiny
causal language model written here (embedding + LayerNorm + causal self-attention + linear head,
Hugging-Face-style dict batches with attention masks), dicts, 3-tuples and an IterableDataset,
scored with the exact solver and with EK-FAC against dense float64 references built from the
model directly (per-sequence masked token losses by torch's own cross_entropy, Jacobians by
torch.autograd.functional)."""
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset

import pbrf_fast
from pbrf_fast.autodiff import unfused_attention
from pbrf_fast.scale import BatchTask, ScoreArguments, ScorePipeline, ScoreTask
from pbrf_fast.losses import SequenceCrossEntropyLoss

DT = torch.float64
VOCAB, LENGTH, WIDTH = 5, 4, 4


class TinyCausalLM(nn.Module):
    """What a Hugging Face causal LM looks like from outside: forward(input_ids, attention_mask)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.position = nn.Parameter(torch.randn(LENGTH, WIDTH) * 0.1)
        self.norm = nn.LayerNorm(WIDTH)
        self.attention = nn.MultiheadAttention(WIDTH, 2, batch_first=True)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, input_ids, attention_mask):
        h = self.norm(self.embed(input_ids) + self.position[: input_ids.shape[1]])
        length = input_ids.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=h.device).triu(1)
        a, _ = self.attention(h, h, h, attn_mask=causal, key_padding_mask=attention_mask == 0, need_weights=False)
        return self.head(h + a)                                     # (b, T, vocab)


def sequences(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
    mask = torch.ones(n, LENGTH, dtype=torch.long)
    for i in range(n):                                           # right padding of 0..2 positions
        pad = i % 3
        if pad:
            mask[i, LENGTH - pad:] = 0
            ids[i, LENGTH - pad:] = 0
    return ids, mask


class DictDataset(Dataset):
    def __init__(self, ids, mask):
        self.ids, self.mask = ids, mask

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.ids[i]}


class TupleDataset(DictDataset):
    def __getitem__(self, i):
        return self.ids[i], self.mask[i], self.ids[i]


class Stream(IterableDataset):
    def __init__(self, ids, mask):
        self.ids, self.mask = ids, mask

    def __iter__(self):
        for i in range(len(self.ids)):
            yield {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.ids[i]}


def make_model():
    torch.manual_seed(0)
    return TinyCausalLM().to(DT).eval()


# --------------------------------------------------------------------------- dense reference
def shifted_targets(ids, mask):
    """Next-token targets: -100 at padding and at the last position."""
    labels = torch.where(mask == 0, -100, ids)
    return torch.cat([labels[:, 1:], torch.full((len(ids), 1), -100)], 1)


def reference_parts(model, ids, mask, reduction, inputs=None):
    """(per-example gradients (n, d), dense GNH (d, d)) of the next-token cross-entropy over the
    scored positions, mean or sum per sequence; ``inputs``: what the model takes (default
    (ids, mask))."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])
    targets = shifted_targets(ids, mask)
    inputs = (ids, mask) if inputs is None else inputs

    def logits(th):
        params = dict(zip(names, [c.reshape(s) for c, s in zip(th.split([s.numel() for s in shapes]), shapes)]))
        return torch.func.functional_call(model, params, inputs)

    def losses(th):
        out = logits(th)
        per_token = nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), targets.reshape(-1),
                                                ignore_index=-100, reduction="none").reshape(len(ids), -1)
        scored = (targets != -100).to(DT)
        total = (per_token * scored).sum(1)
        return total if reduction == "sum" else total / scored.sum(1).clamp_min(1)

    with unfused_attention():
        grads = torch.autograd.functional.jacobian(losses, theta)                   # (n, d)
        J = torch.autograd.functional.jacobian(logits, theta)                        # (n, T, V, d)
    p = torch.softmax(logits(theta).detach(), -1)
    scored = (targets != -100).to(DT)
    weights = scored if reduction == "sum" else scored / scored.sum(1, keepdim=True).clamp_min(1)
    H = (torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)) * weights[..., None, None]
    G = torch.einsum("ntvd,ntvw,ntwe->de", J, H, J) / len(ids)
    return grads, G


def run_pipeline(tmp_path, train, test, batch_task=None, reduction="mean", **arguments):
    loss = SequenceCrossEntropyLoss(reduction=reduction)
    task = ScoreTask(make_model(), loss, train, test, batch_task=batch_task)
    args = ScoreArguments(damping=0.1, self_influence=False, top_k=2, **arguments)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pipeline = ScorePipeline(task, args, tmp_path, progress=False)
        pipeline.run()
    return pipeline, np.load(tmp_path / "scores.npy")


@pytest.mark.parametrize("reduction,solver", [("mean", "direct"), ("sum", "direct"), ("mean", "pcg-ekfac")])
def test_causal_lm_dict_batches_with_the_exact_solver_match_dense(tmp_path, reduction, solver):
    ids, mask = sequences(6, 0)
    test_ids, test_mask = sequences(3, 1)
    options = {}
    if solver == "pcg-ekfac":  # PCG on the exact GNH, preconditioned by EK-FAC (attention blocks included)
        solver, options = "pcg", {"preconditioner": "ekfac", "tol": 1e-10, "max_iter": 400}
    _, scores = run_pipeline(tmp_path, DictDataset(ids, mask), DictDataset(test_ids, test_mask),
                             BatchTask(shift_labels=True), reduction, solver=solver, solver_options=options)
    model = make_model()
    grads, G = reference_parts(model, ids, mask, reduction)
    test_grads, _ = reference_parts(model, test_ids, test_mask, reduction)
    expected = grads @ torch.linalg.solve(G + 0.1 * torch.eye(len(G), dtype=DT), test_grads.T) / len(ids)
    assert np.abs(scores - expected.numpy()).max() <= 1e-5 * np.abs(expected.numpy()).max()  # float32 on disk


def test_causal_lm_with_ekfac_matches_its_dense_operator(tmp_path):
    ids, mask = sequences(6, 0)
    test_ids, test_mask = sequences(3, 1)
    pipeline, scores = run_pipeline(tmp_path, DictDataset(ids, mask), DictDataset(test_ids, test_mask),
                                    BatchTask(shift_labels=True), curvature="ekfac")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        op = pipeline.curvature_operator(0)           # factors read back from disk
    # the attention's query / key / value / output blocks are factored (causal and padding masks)
    assert op.coverage["kronecker"] == ["model.attention.in_proj[q]", "model.attention.in_proj[k]",
                                        "model.attention.in_proj[v]", "model.attention.out_proj", "model.head"]
    model = make_model()
    grads, _ = reference_parts(model, ids, mask, "mean")
    test_grads, _ = reference_parts(model, test_ids, test_mask, "mean")
    expected = grads @ torch.linalg.solve(op.dense(), test_grads.T) / len(ids)
    assert np.abs(scores - expected.numpy()).max() <= 1e-5 * np.abs(expected.numpy()).max()


@pytest.mark.parametrize("form", ["3-tuples", "iterable", "iterable-with-length", "dataloader-over-stream"])
def test_tuples_and_streams_score_like_dicts(tmp_path, form):
    ids, mask = sequences(6, 0)
    test_ids, test_mask = sequences(3, 1)
    _, expected = run_pipeline(tmp_path / "dict", DictDataset(ids, mask), DictDataset(test_ids, test_mask),
                               BatchTask(shift_labels=True), solver="direct")
    if form == "3-tuples":
        train, test = TupleDataset(ids, mask), TupleDataset(test_ids, test_mask)
        batch_task = BatchTask(attention_mask=1, shift_labels=True)
    else:
        train, test = Stream(ids, mask), Stream(test_ids, test_mask)
        if form == "iterable-with-length":
            train.__class__ = type("SizedStream", (Stream,), {"__len__": lambda self: len(self.ids)})
        if form == "dataloader-over-stream":
            from torch.utils.data import DataLoader
            train, test = DataLoader(train, batch_size=4), DataLoader(test, batch_size=2)
        batch_task = BatchTask(shift_labels=True)
    _, scores = run_pipeline(tmp_path / form, train, test, batch_task, solver="direct", batch_size=4)
    assert np.allclose(scores, expected, rtol=1e-6, atol=1e-9)


def test_default_batch_task_reads_dicts_and_names_what_is_missing():
    ids, mask = sequences(4, 0)
    task = ScoreTask(make_model(), "token_cross_entropy", DictDataset(ids, mask), DictDataset(ids, mask))
    x, t = task.train.range(0, 4)
    assert t.shape == (4, LENGTH) and (t == -100).sum() == int((mask == 0).sum())  # padding not scored
    fields = task.batch_task.unpack(x)
    assert torch.equal(fields["input_ids"], ids) and torch.equal(fields["attention_mask"], mask)
    with pytest.raises(pbrf_fast.errors.InputError, match="no targets field 'target'"):
        ScoreTask(make_model(), "token_cross_entropy", DictDataset(ids, mask), DictDataset(ids, mask),
                  batch_task=BatchTask(targets="target"))


MODEL_FILE = '''
import torch
from torch import nn


class TokenLM(nn.Module):
    """Token ids in (pad id 0 masked out of attention), next-token logits out."""

    def __init__(self):
        super().__init__()
        self.embed, self.norm = nn.Embedding(5, 4), nn.LayerNorm(4)
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 5)

    def forward(self, ids):
        h = self.norm(self.embed(ids))
        causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).triu(1)
        return self.head(h + self.attention(h, h, h, attn_mask=causal, need_weights=False)[0])


def make_model():
    torch.manual_seed(0)
    return TokenLM().double()
'''


@pytest.mark.parametrize("curvature", ["gnh", "ekfac"])
def test_scores_command_takes_a_language_model_file(tmp_path, curvature):
    from pbrf_fast.cli import main
    (tmp_path / "lm.py").write_text(MODEL_FILE)
    ids, mask = sequences(6, 0)
    targets = shifted_targets(ids, mask)
    torch.save({"x_train": ids, "y_train": targets, "x_test": ids[:2], "y_test": targets[:2]}, tmp_path / "data.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert main(["scores", "--model", f"{tmp_path / 'lm.py'}:make_model", "--data", str(tmp_path / "data.pt"),
                     "--loss", "token_cross_entropy", "--curvature", curvature, "--no-progress",
                     "--no-self-influence", "--out", str(tmp_path / "out")]) in (0, None)
    scores = np.load(tmp_path / "out" / "scores.npy")
    assert scores.shape == (6, 2) and np.isfinite(scores).all()
    # a training point scored against itself as a test point: positive (its own loss goes up)
    assert scores[0, 0] > 0 and scores[1, 1] > 0
    import json
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["damping"]["0"]["value"] > 0  # "auto"


@pytest.mark.parametrize("curvature", ["gnh", "ekfac"])
def test_the_papers_transformer_lm_through_the_pipeline(tmp_path, curvature):
    """pbrf_fast.paper.models.TransformerLM (2 layers, its own causal attention of nn.Linear
    projections: K-FAC factors them with one token per position) on token tensors."""
    from pbrf_fast.paper.models import transformer_lm
    from pbrf_fast.scale import compute_scores

    ids, mask = sequences(6, 0)
    mask = torch.ones_like(mask)                                   # PTB windows have no padding
    test_ids = sequences(2, 1)[0]
    model = transformer_lm(VOCAB, width=4, heads=2, layers=2, max_len=LENGTH, seed=0).to(DT).eval()
    targets, test_targets = shifted_targets(ids, mask), shifted_targets(test_ids, torch.ones_like(test_ids))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        compute_scores(model, "token_cross_entropy", ids, targets, test_ids, test_targets, tmp_path, progress=False,
                       damping=0.1, solver="direct" if curvature == "gnh" else "auto", curvature=curvature,
                       self_influence=False)
    scores = np.load(tmp_path / "scores.npy")
    grads, G = reference_parts(model, ids, mask, "mean", inputs=(ids,))
    test_grads, _ = reference_parts(model, test_ids, torch.ones_like(test_ids), "mean", inputs=(test_ids,))
    if curvature == "gnh":
        operator = G + 0.1 * torch.eye(len(G), dtype=DT)
    else:  # the EK-FAC operator the pipeline stored: the Linear projections factored, per token
        problem = pbrf_fast.Problem(model, "token_cross_entropy", ids, targets)
        factors = pbrf_fast.curvatures.KroneckerFactors.from_state_dict(torch.load(tmp_path / "factors_ekfac.pt"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            op = pbrf_fast.KroneckerCurvature(problem, 0.1, "ekfac", factors=factors)
        assert "blocks.0.attention.qkv" in op.coverage["kronecker"] and "head" in op.coverage["kronecker"]
        operator = op.dense()
    expected = grads @ torch.linalg.solve(operator, test_grads.T) / len(ids)
    assert np.abs(scores - expected.numpy()).max() <= 1e-5 * np.abs(expected.numpy()).max()


def test_influence_on_dict_batches_matches_dense():
    """Influence (not the pipeline) on a Dataset of dicts, through problem_from_data."""
    from pbrf_fast.scale.data import DataSource
    from pbrf_fast.scale import problem_from_data

    ids, mask = sequences(6, 0)
    test_ids, test_mask = sequences(3, 1)
    model = make_model()
    problem, _ = problem_from_data(model, SequenceCrossEntropyLoss(), DictDataset(ids, mask),
                                   BatchTask(shift_labels=True))
    x_test, t_test = DataSource(DictDataset(test_ids, test_mask), "test", problem.batch_task).range(0, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        scores = pbrf_fast.Influence(problem, damping=0.1, solver="direct").scores(x_test, t_test)
    grads, G = reference_parts(model, ids, mask, "mean")
    test_grads, _ = reference_parts(model, test_ids, test_mask, "mean")
    expected = grads @ torch.linalg.solve(G + 0.1 * torch.eye(len(G), dtype=DT), test_grads.T) / len(ids)
    assert float((scores - expected).norm() / expected.norm()) < 1e-10


class HuggingFaceStyle(nn.Module):
    """Returns an output object with .logits, as transformers' models do."""

    def __init__(self):
        super().__init__()
        self.inner = make_model()

    def forward(self, input_ids, attention_mask):
        from types import SimpleNamespace
        return SimpleNamespace(logits=self.inner(input_ids, attention_mask), loss=None)


def test_an_output_object_with_logits_is_read_like_its_logits(tmp_path):
    ids, mask = sequences(6, 0)
    test_ids, test_mask = sequences(2, 1)
    _, expected = run_pipeline(tmp_path / "plain", DictDataset(ids, mask), DictDataset(test_ids, test_mask),
                               BatchTask(shift_labels=True), solver="direct")
    task = ScoreTask(HuggingFaceStyle().to(DT), SequenceCrossEntropyLoss(), DictDataset(ids, mask),
                     DictDataset(test_ids, test_mask), batch_task=BatchTask(shift_labels=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ScorePipeline(task, ScoreArguments(damping=0.1, self_influence=False, top_k=2, solver="direct"),
                      tmp_path / "hf", progress=False).run()
    assert np.allclose(np.load(tmp_path / "hf" / "scores.npy"), expected, rtol=1e-6, atol=1e-9)


def test_batches_padded_to_their_own_length_score_like_fixed_length_ones(tmp_path):
    """Data collated with padding to each batch's longest sequence (as Hugging Face's
    DataCollatorWithPadding does): max_length right-pads every batch to one length."""
    from torch.utils.data import DataLoader

    ids, mask = sequences(6, 0)
    test_ids, test_mask = sequences(2, 1)
    _, expected = run_pipeline(tmp_path / "fixed", DictDataset(ids, mask), DictDataset(test_ids, test_mask),
                               BatchTask(shift_labels=True), solver="direct")

    def collate_trimmed(items):  # pad only to the longest sequence of this batch
        batch = torch.utils.data.default_collate(items)
        longest = int(batch["attention_mask"].sum(1).max())
        return {k: v[:, :longest] for k, v in batch.items()}

    train = DataLoader(DictDataset(ids, mask), batch_size=2, collate_fn=collate_trimmed)
    test = DataLoader(DictDataset(test_ids, test_mask), batch_size=2, collate_fn=collate_trimmed)
    with pytest.raises(pbrf_fast.errors.InputError, match="max_length"):
        ScorePipeline(ScoreTask(make_model(), SequenceCrossEntropyLoss(), train, test,
                                batch_task=BatchTask(shift_labels=True)),
                      ScoreArguments(damping=0.1, self_influence=False, solver="direct", batch_size=2),
                      tmp_path / "unpadded", progress=False).run()
    _, scores = run_pipeline(tmp_path / "padded", train, test, BatchTask(shift_labels=True, max_length=LENGTH),
                             solver="direct", batch_size=2)
    assert np.allclose(scores, expected, rtol=1e-6, atol=1e-9)


PTB_MODEL_FILE = '''
from pbrf_fast.paper.models import transformer_lm


def make_model():
    return transformer_lm(10000, width=8, heads=2, layers=2, max_len=10, seed=0)
'''


@pytest.mark.slow
def test_the_papers_lm_on_ptb_through_the_scores_command(tmp_path):
    """The paper's 2-layer Transformer LM on the real PTB windows, as a user's model file through
    `pbrf-fast scores` (a smoke test: 10k-token vocabulary, so no dense reference here; the same
    model is checked against dense float64 on a small vocabulary above)."""
    from factories import shared_data_dir
    from pbrf_fast.cli import main
    from pbrf_fast.paper.data.ptb import load_ptb

    data_dir = shared_data_dir()
    if data_dir is None or not (data_dir / "ptb" / "ptb.train.txt").is_file():
        pytest.skip("PTB not found (../shared/data/ptb or $PBRF_DATA)")
    x, y, x_test, y_test, vocabulary = load_ptb(data_dir, seq_len=10)
    assert len(vocabulary) == 10000
    torch.save({"x_train": x[:8], "y_train": y[:8], "x_test": x_test[:2], "y_test": y_test[:2]}, tmp_path / "data.pt")
    (tmp_path / "ptb_lm.py").write_text(PTB_MODEL_FILE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        main(["scores", "--model", f"{tmp_path / 'ptb_lm.py'}:make_model", "--data", str(tmp_path / "data.pt"),
              "--loss", "token_cross_entropy", "--solver", "cg", "--cg-iters", "20", "--no-self-influence",
              "--no-progress", "--out", str(tmp_path / "out")])
    scores = np.load(tmp_path / "out" / "scores.npy")
    assert scores.shape == (8, 2) and np.isfinite(scores).all() and np.abs(scores).max() > 0
