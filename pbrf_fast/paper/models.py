"""Model builders for the paper's experiments.

Convolutional models take ``in_shape`` = (channels, height, width), sized for
28x28 MNIST-like and 32x32 CIFAR-like inputs. None uses batch statistics:
influence treats the network as a fixed function of its parameters, and the
vectorised retraining runs many copies through torch.func.vmap.
"""
from __future__ import annotations

import torch
from torch import nn

from .resnet import resnet20

__all__ = ["mlp", "logistic_regression", "autoencoder", "lenet", "alexnet", "vgg13", "resnet20", "build_model",
           "transformer_lm", "MODELS"]

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


def _seeded(seed):
    if seed is not None:
        torch.manual_seed(seed)


def mlp(d_in: int, hidden: tuple[int, ...], d_out: int, activation: str = "relu", seed: int | None = None,
        dtype=torch.float32) -> nn.Sequential:
    """Linear layers of the given widths with one activation between them."""
    _seeded(seed)
    layers, width = [], d_in
    for h in hidden:
        layers += [nn.Linear(width, h), _ACTIVATIONS[activation]()]
        width = h
    layers.append(nn.Linear(width, d_out))
    return nn.Sequential(*layers).to(dtype)


def logistic_regression(d_in: int, seed: int | None = None, dtype=torch.float64, num_outputs: int = 1) -> nn.Linear:
    """Binary (one output, sigmoid loss) or multinomial (``num_outputs`` classes) logistic regression."""
    _seeded(seed)
    return nn.Linear(d_in, num_outputs).to(dtype)


def autoencoder(seed: int | None = None, widths=(784, 1000, 500, 250, 30, 250, 500, 1000, 784)) -> nn.Sequential:
    """The MNIST autoencoder of Martens & Grosse: sigmoid units, logits out (use the bce loss, targets = inputs)."""
    return mlp(widths[0], tuple(widths[1:-1]), widths[-1], activation="sigmoid", seed=seed)


def lenet(in_shape=(1, 28, 28), num_classes: int = 10, seed: int | None = None) -> nn.Sequential:
    _seeded(seed)
    channels, size, _ = in_shape
    pad = 2 if size == 28 else 0  # both sizes reach 5x5 before the classifier
    return nn.Sequential(
        nn.Conv2d(channels, 6, 5, padding=pad), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes))


def alexnet(in_shape=(1, 28, 28), num_classes: int = 10, seed: int | None = None) -> nn.Sequential:
    """AlexNet's five-convolution layout, scaled to small images."""
    _seeded(seed)
    channels, size, _ = in_shape
    final = size // 8
    return nn.Sequential(
        nn.Conv2d(channels, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 192, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(256 * final * final, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, num_classes))


def vgg13(in_shape=(3, 32, 32), num_classes: int = 10, seed: int | None = None) -> nn.Sequential:
    """VGG13 (configuration B) for 32x32 inputs; 28x28 inputs are zero-padded to 32."""
    _seeded(seed)
    channels, size, _ = in_shape
    layers: list[nn.Module] = [nn.ZeroPad2d((32 - size) // 2)] if size < 32 else []
    for width in (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"):
        if width == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
            channels = width
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(512, num_classes))


MODELS = ("logreg", "mlp", "autoencoder", "lenet", "alexnet", "vgg13", "resnet20", "transformer")


def build_model(name: str, in_shape, num_outputs: int, seed: int | None = None, width: int = 128, depth: int = 2):
    """A model by name for inputs of ``in_shape`` (features or (C, H, W)) and ``num_outputs`` outputs."""
    if name == "mlp":
        d_in = int(torch.tensor(in_shape).prod())
        return mlp(d_in, (width,) * depth, num_outputs, seed=seed)
    if name == "autoencoder":
        return autoencoder(seed=seed)
    if name in ("lenet", "alexnet", "vgg13"):
        return {"lenet": lenet, "alexnet": alexnet, "vgg13": vgg13}[name](tuple(in_shape), num_outputs, seed=seed)
    if name == "resnet20":
        return resnet20(num_outputs, seed=seed, in_channels=int(in_shape[0]) if len(in_shape) == 3 else 3)
    if name == "logreg":
        return logistic_regression(int(torch.tensor(in_shape).prod()), seed=seed, num_outputs=num_outputs)
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


class CausalSelfAttention(nn.Module):
    """Multi-head attention over earlier positions only, in plain tensor ops (vmap-friendly)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, h):
        b, t, w = h.shape
        q, k, v = self.qkv(h).reshape(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / (w // self.heads) ** 0.5
        mask = torch.ones(t, t, dtype=torch.bool, device=h.device).triu(1)
        attention = torch.softmax(scores.masked_fill(mask, float("-inf")), -1)
        return self.out((attention @ v).transpose(1, 2).reshape(b, t, w))


class TransformerBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = CausalSelfAttention(width, heads)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, h):
        h = h + self.attention(self.norm1(h))
        return h + self.mlp(self.norm2(h))


class TransformerLM(nn.Module):
    """A small pre-norm Transformer language model: token ids (b, T) -> logits (b, T, vocab)."""

    def __init__(self, vocab: int, width: int = 256, heads: int = 2, layers: int = 2, max_len: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.zeros(max_len, width))
        self.blocks = nn.Sequential(*[TransformerBlock(width, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens):
        h = self.embed(tokens) + self.position[: tokens.shape[1]]
        return self.head(self.norm(self.blocks(h)))


def transformer_lm(vocab: int, width: int = 256, heads: int = 2, layers: int = 2, max_len: int = 64,
                   seed: int | None = None) -> TransformerLM:
    _seeded(seed)
    return TransformerLM(vocab, width, heads, layers, max_len)
