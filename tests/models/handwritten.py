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


class CausalMixer(nn.Module):
    """Causal self-attention with an explicit cache (k, v: [B, H, P, D])."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.wq, self.wk, self.wv, self.proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x, past=None):
        b, t, d = x.shape
        q, k, v = (w(x).view(b, t, self.heads, -1).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        p = k.shape[2] - t
        # query i sees keys 0..p+i
        mask = torch.ones(t, k.shape[2], dtype=torch.bool).tril(diagonal=p)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(b, t, d)), (k, v)


class DecoderLayer(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.att, self.ff = CausalMixer(d, heads), FeedForward(d)

    def forward(self, x, past=None):
        a, present = self.att(self.n1(x), past)
        x = x + a
        return x + self.ff(self.n2(x)), present


class TinyDecoder(nn.Module):
    """A hand-written causal LM following optcc's decoder protocol:
    forward(input_ids) -> logits, forward_with_cache(input_ids, past) -> (logits, present), num_layers."""

    def __init__(self, vocab: int = 64, d: int = 32, heads: int = 2, depth: int = 3, positions: int = 128) -> None:
        super().__init__()
        self.num_layers = depth
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(positions, d)
        self.blocks = nn.ModuleList(DecoderLayer(d, heads) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward_with_cache(self, input_ids, past):
        p = past[0][0].shape[2] if past else 0
        x = self.tok(input_ids) + self.pos(torch.arange(p, p + input_ids.shape[1]))
        present = []
        for i, blk in enumerate(self.blocks):
            x, kv = blk(x, past[i] if past else None)
            present.append(kv)
        return self.head(self.norm(x)), present

    def forward(self, input_ids):
        return self.forward_with_cache(input_ids, None)[0]


def build_decoder():
    torch.manual_seed(0)
    return TinyDecoder().eval()


def build_decoder_deep():
    """Four layers: enough for layer_skip followed by kv_share merge."""
    torch.manual_seed(0)
    return TinyDecoder(depth=4).eval()
