"""Hand-written transformers with names no HF model uses, for structure tests.
Used as `tests/models/handwritten.py:build` (sdpa) and `:build_softmax` (explicit softmax)."""
import torch
import torch.nn.functional as F
from torch import nn


class Mixer(nn.Module):
    def __init__(self, d: int, heads: int, explicit: bool) -> None:
        super().__init__()
        self.heads, self.explicit = heads, explicit
        self.wq, self.wk, self.wv, self.proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (w(x).view(b, t, self.heads, -1).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        if self.explicit:
            att = torch.softmax(q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5), dim=-1)
            y = att @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class FeedForward(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin_in, self.lin_out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return self.lin_out(F.gelu(self.lin_in(x)))


class Layer(nn.Module):
    def __init__(self, d: int, heads: int, explicit: bool) -> None:
        super().__init__()
        self.pre1, self.pre2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.mix, self.ff = Mixer(d, heads, explicit), FeedForward(d)

    def forward(self, x):
        x = x + self.mix(self.pre1(x))
        return x + self.ff(self.pre2(x))


class Net(nn.Module):
    def __init__(self, vocab: int = 100, d: int = 32, heads: int = 4, depth: int = 3, explicit: bool = False) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.trunk = nn.ModuleList(Layer(d, heads, explicit) for _ in range(depth))
        self.out_norm, self.readout = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, input_ids):
        x = self.tok(input_ids)
        for layer in self.trunk:
            x = layer(x)
        return self.readout(self.out_norm(x))


def build():
    torch.manual_seed(0)
    return Net().eval()


def build_softmax():
    torch.manual_seed(0)
    return Net(explicit=True).eval()


def build_tensor():
    """A model over float inputs, returning its own example inputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    return model, {"input": torch.randn(4, 16)}
