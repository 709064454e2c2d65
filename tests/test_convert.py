"""convert: the authors' checkpoint layout (ttt-lm-pytorch) <-> ours, and the function it computes.

The official state dict is built here from the documented layout (names and shapes), and the
model it describes is computed by a plain float64 reference written from the paper and the
authors' description: per block [x + conv(rms(x))], rms norm, Q/K/V (or one Q through conv_q and
conv_k), RoPE at t mod b on pairs (2i, 2i+1), the mini-batch TTT-Linear update token by token,
post LayerNorm, [GELU gate], o_proj, residual, SwiGLU.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ttt_helpers.compat import cache_kwargs, output_cache
from ttt_helpers.model import TTTConfig, TTTForCausalLM
from ttt_helpers.model.convert import from_official, name_pairs, to_official

F64 = torch.float64
SMALL = dict(vocab_size=53, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)


def official_config(kind: str, mamba: bool) -> dict:
    return dict(**SMALL, ttt_layer_type=kind, mini_batch_size=16, pre_conv=mamba, share_qk=mamba, use_gate=mamba)


def official_state_dict(config: dict, gen: torch.Generator) -> dict:
    """Random weights under the authors' names and shapes."""
    C, H, I, V = (config[k] for k in ("hidden_size", "num_attention_heads", "intermediate_size", "vocab_size"))
    D, b, k, mlp = C // H, config["mini_batch_size"], 4, config["ttt_layer_type"] == "mlp"
    shapes = {"model.embed_tokens.weight": (V, C), "model.norm.weight": (C,)}
    for i in range(config["num_hidden_layers"]):
        p, s = f"model.layers.{i}.", f"model.layers.{i}.seq_modeling_block."
        shapes |= {s + n: (C, C) for n in ("q_proj.weight", "v_proj.weight", "o_proj.weight")}
        if config["share_qk"]:
            shapes |= {s + f"{c}.weight": (C, 1, k) for c in ("conv_q", "conv_k")}
            shapes |= {s + f"{c}.bias": (C,) for c in ("conv_q", "conv_k")}
        else:
            shapes[s + "k_proj.weight"] = (C, C)
        if config["use_gate"]:
            shapes[s + "g_proj.weight"] = (C, C)
        shapes |= {
            s + "learnable_ttt_lr_weight": (H, 1, C),
            s + "learnable_ttt_lr_bias": (H, 1),
            s + "learnable_token_idx": (b,),
            s + "ttt_norm_weight": (H, D),
            s + "ttt_norm_bias": (H, D),
            s + "post_norm.weight": (C,),
            s + "post_norm.bias": (C,),
        }
        width = 4 * D if mlp else D
        shapes |= {s + "W1": (H, D, width), s + "b1": (H, 1, width)}
        if mlp:
            shapes |= {s + "W2": (H, width, D), s + "b2": (H, 1, D)}
        shapes |= {p + "mlp.gate_proj.weight": (I, C), p + "mlp.up_proj.weight": (I, C)}
        shapes |= {p + "mlp.down_proj.weight": (C, I), p + "seq_norm.weight": (C,), p + "ffn_norm.weight": (C,)}
        if config["pre_conv"]:
            shapes |= {p + "conv.norm.weight": (C,), p + "conv.conv.weight": (C, 1, k), p + "conv.conv.bias": (C,)}
    sd = {}
    for name, shape in shapes.items():
        centre = 1.0 if name.endswith(("norm.weight", "norm_weight")) else 0.0
        scale = 0.3 if "conv" in name or "token_idx" in name else 0.15
        sd[name] = centre + scale * torch.randn(shape, generator=gen, dtype=F64)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    return sd


def rms(x, w, eps=1e-6):
    """RMSNorm as the authors (and Llama) compute it: normalised in float32, cast back, then scaled."""
    h = x.float()
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def ln(x, w, b, eps=1e-6):
    mu, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True, unbiased=False)
    return w * (x - mu) / torch.sqrt(var + eps) + b


def causal_conv(x, w, bias):
    """x: [B, T, C], w: [C, 1, k]: y[t] = bias + sum_j w[j] x[t - k + 1 + j] (zeros before the start)."""
    k = w.shape[-1]
    padded = F.pad(x, (0, 0, k - 1, 0))
    return bias + sum(w[:, 0, j] * padded[:, j : j + x.shape[1]] for j in range(k))


def rope(x, theta=10000.0, b=16):
    """x: [B, H, T, D]; pair (2i, 2i+1) turned by (t mod b) * theta^(-2i/D), the table in float32."""
    D = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, D, 2).float() / D)
    angle = (torch.arange(x.shape[2]) % b).float()[:, None] * inv
    c, s = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    out = x.clone()
    out[..., 0::2] = x[..., 0::2] * c - x[..., 1::2] * s
    out[..., 1::2] = x[..., 1::2] * c + x[..., 0::2] * s
    return out


def ttt_linear_naive(XQ, XK, XV, lr, W, bias, token_idx, ln_w, ln_b, b=16):
    """Mini-batch gradient descent token by token. XQ..XV: [D] per token lists over T for one head."""
    out = []
    for start in range(0, len(XQ), b):
        idx = range(start, min(start + b, len(XQ)))
        grads = []
        for j in idx:
            z = (XK[j] @ W + bias).detach().requires_grad_(True)
            loss = 0.5 * (ln(z, ln_w, ln_b) - (XV[j] - XK[j])).pow(2).sum()
            (g,) = torch.autograd.grad(loss, z)
            grads.append(g)
        for n, i in enumerate(idx):
            gW = sum(lr[j] * torch.outer(XK[j], grads[m]) for m, j in enumerate(idx) if m <= n)
            gb = sum(lr[j] * grads[m] for m, j in enumerate(idx) if m <= n)
            eta = token_idx[n].clamp(min=0)
            out.append(XQ[i] + ln(XQ[i] @ (W - eta * gW) + bias - eta * gb, ln_w, ln_b))
        W, bias = W - eta * gW, bias - eta * gb
    return torch.stack(out)


def reference_logits(sd: dict, config: dict, ids: torch.Tensor) -> torch.Tensor:
    """The authors' TTT-Linear model, computed plainly in float64 from their state dict."""
    C, H = config["hidden_size"], config["num_attention_heads"]
    D, b = C // H, config["mini_batch_size"]
    x = sd["model.embed_tokens.weight"][ids]
    B, T, _ = x.shape
    for i in range(config["num_hidden_layers"]):
        p, s = f"model.layers.{i}.", f"model.layers.{i}.seq_modeling_block."
        if config["pre_conv"]:
            x = x + causal_conv(
                rms(x, sd[p + "conv.norm.weight"]), sd[p + "conv.conv.weight"], sd[p + "conv.conv.bias"]
            )
        h = rms(x, sd[p + "seq_norm.weight"])
        q = h @ sd[s + "q_proj.weight"].T
        if config["share_qk"]:
            XQ, XK = (causal_conv(q, sd[s + f"{c}.weight"], sd[s + f"{c}.bias"]) for c in ("conv_q", "conv_k"))
        else:
            XQ, XK = q, h @ sd[s + "k_proj.weight"].T
        heads = lambda t: t.reshape(B, T, H, D).transpose(1, 2)  # noqa: E731
        XQ, XK, XV = rope(heads(XQ), b=b), rope(heads(XK), b=b), heads(h @ sd[s + "v_proj.weight"].T)
        gate = torch.einsum("btc,hc->bht", h, sd[s + "learnable_ttt_lr_weight"][:, 0]) + sd[s + "learnable_ttt_lr_bias"]
        lr = torch.sigmoid(gate) / D  # ttt_base_lr = 1
        token_idx = 1.0 / torch.arange(1, b + 1, dtype=F64) + sd[s + "learnable_token_idx"]
        Z = torch.stack(
            [
                torch.stack(
                    [
                        ttt_linear_naive(
                            XQ[r, n], XK[r, n], XV[r, n], lr[r, n], sd[s + "W1"][n], sd[s + "b1"][n, 0],
                            token_idx, sd[s + "ttt_norm_weight"][n], sd[s + "ttt_norm_bias"][n], b,
                        )
                        for n in range(H)
                    ]
                )
                for r in range(B)
            ]
        )  # fmt: skip
        y = ln(Z.transpose(1, 2).reshape(B, T, C), sd[s + "post_norm.weight"], sd[s + "post_norm.bias"])
        if config["use_gate"]:
            y = y * F.gelu(h @ sd[s + "g_proj.weight"].T, approximate="tanh")
        x = x + y @ sd[s + "o_proj.weight"].T
        f = rms(x, sd[p + "ffn_norm.weight"])
        up = F.silu(f @ sd[p + "mlp.gate_proj.weight"].T) * (f @ sd[p + "mlp.up_proj.weight"].T)
        x = x + up @ sd[p + "mlp.down_proj.weight"].T
    return rms(x, sd["model.norm.weight"]) @ sd["lm_head.weight"].T


@pytest.mark.parametrize("mamba", [False, True])
@pytest.mark.parametrize("T", [32, 21])
def test_official_layout_gives_the_reference_logits(mamba, T, rng):
    config = official_config("linear", mamba)
    sd = official_state_dict(config, rng)
    ids = torch.randint(0, SMALL["vocab_size"], (2, T), generator=rng)
    model = from_official(sd, config).eval()
    assert next(model.parameters()).dtype == F64
    with torch.no_grad():
        got = model(ids, use_cache=False).logits
    want = reference_logits(sd, config, ids)
    err = (got - want).abs().max().item()
    assert err < 1e-10, f"seed {rng.initial_seed()}: max |ours - reference| = {err:.2e}"


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("mamba", [False, True])
def test_round_trip_both_ways(kind, mamba, rng):
    """official -> ours -> official is the identity; ours -> official -> ours gives the same logits,
    streamed in pieces (a prefill ending inside a mini-batch, then single tokens) as in one call."""
    config = official_config(kind, mamba)
    sd = official_state_dict(config, rng)
    model = from_official(sd, config).eval()
    back, back_config = to_official(model)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    assert all(back_config[k] == v for k, v in config.items())
    again = from_official(back, back_config).eval()
    ids = torch.randint(0, SMALL["vocab_size"], (2, 37), generator=rng)
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
        assert torch.equal(again(ids, use_cache=False).logits, want)
        out = again(ids[:, :21], use_cache=True)
        pieces, cache = [out.logits], output_cache(out)
        for t in range(21, 37):
            pieces.append(again(ids[:, t : t + 1], **cache_kwargs(cache)).logits)
    err = (torch.cat(pieces, 1) - want).abs().max().item()
    assert err < 1e-11, f"seed {rng.initial_seed()}: streamed vs one call {err:.2e}"


def test_name_pairs_cover_every_parameter():
    for kind in ("linear", "mlp"):
        for mamba in (False, True):
            config = TTTConfig(**official_config(kind, mamba))
            with torch.device("meta"):
                model = TTTForCausalLM(config)
            ours = {b for _, b in name_pairs(config)}
            assert ours == set(model.state_dict()), (kind, mamba)


def test_from_pretrained_reads_a_folder_in_the_official_layout(tmp_path, rng):
    config = official_config("mlp", True)
    sd = official_state_dict(config, rng)
    saved = {k: v.float().contiguous() for k, v in sd.items() if k != "lm_head.weight"}  # tied: saved once
    save_file(saved, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(
        json.dumps({**config, "model_type": "ttt", "architectures": ["TTTForCausalLM"]})
    )
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(model, TTTForCausalLM) and model.config.backbone == "mamba"
    direct = from_official(saved, config).eval()
    ids = torch.randint(0, SMALL["vocab_size"], (1, 19), generator=rng)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, direct(ids).logits)
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_a_tied_config_with_a_head_of_its_own_is_refused(rng):
    """The config ties lm_head to the embeddings but the state dict's head differs: dropping it
    would change the model's function."""
    config = official_config("linear", False)
    sd = official_state_dict(config, rng)
    sd["lm_head.weight"] = sd["lm_head.weight"] + 0.01
    with pytest.raises(ValueError, match="lm_head.weight differs from model.embed_tokens.weight.*tie_word_embeddings"):
        from_official(sd, config)
    untied = from_official(sd, {**config, "tie_word_embeddings": False})
    assert torch.equal(untied.lm_head.weight, sd["lm_head.weight"])


@pytest.mark.parametrize("dtype", ["float32", torch.float32, "bfloat16", "float64"])
def test_from_pretrained_of_an_official_folder_takes_a_dtype_by_name(tmp_path, rng, dtype):
    config = official_config("linear", False)
    sd = official_state_dict(config, rng)  # float64 weights
    save_file({k: v.contiguous() for k, v in sd.items() if k != "lm_head.weight"}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "ttt"}))
    model = TTTForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    want = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    assert {p.dtype for p in model.parameters()} == {want}
    with pytest.raises(ValueError, match="dtype must be a torch.dtype, 'auto' or a dtype's name"):
        TTTForCausalLM.from_pretrained(tmp_path, dtype="float33")


def test_bad_input():
    config = official_config("linear", False)
    sd = official_state_dict(config, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="missing"):
        from_official({k: v for k, v in sd.items() if "W1" not in k}, config)
    with pytest.raises(ValueError, match="unexpected"):
        from_official({**sd, "model.extra.weight": torch.zeros(1)}, config)
    with pytest.raises(TypeError, match="state_dict must be a dict"):
        from_official([], config)
    with pytest.raises(ValueError, match="model_type"):
        from_official(sd, {**config, "model_type": "llama"})
    with pytest.raises(TypeError, match="model must be a TTTForCausalLM"):
        to_official(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="use_gate=False contradicts backbone='mamba'"):
        TTTConfig(**SMALL, backbone="mamba", use_gate=False)
