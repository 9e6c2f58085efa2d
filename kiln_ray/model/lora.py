"""LoRA on CausalLM: where adapters attach, how they are trained, and how many are served at once.

A LoRA *site* is one transformers module of one layer (`q_proj` of layer 3, say) mapped onto
rows of one of our fused projections:

    q_proj -> self_attn.qkv_proj rows of part q   (Qwen3.5: also the gate part, rows
    k_proj -> self_attn.qkv_proj rows of part k    interleaved per head in transformers)
    gate_proj / up_proj -> mlp.gate_up_proj parts;  in_proj_qkv/z/b/a -> linear_attn.in_proj parts

    LoraWeights      an adapter in memory: per site A (r, in), B (out, r), float32, and alpha;
                     converts to and from PEFT's tensor names
    TrainableLora    the parameters a trainer optimises (one adapter, autograd)
    AdapterSlots     `max_loras` adapters resident for serving, stacked per projection
                     (kernels/lora.py); LoraBatch says which rows of a step use which slot
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from kernels.lora import lora_delta
from kiln_ray.model.layers import Linear

# Kiln's defaults: attention projections on full-attention layers, the MLP on every layer.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LINEAR_ATTENTION_TARGETS = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")
_PEFT_PREFIX = "base_model.model.model.layers"
_BLOCK = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp", "in_proj_qkv": "linear_attn",
          "in_proj_z": "linear_attn", "in_proj_b": "linear_attn", "in_proj_a": "linear_attn", "out_proj": "linear_attn"}

SiteKey = tuple[int, str]  # (layer index, transformers module name)


@dataclass(frozen=True)
class LoraSite:
    layer: int
    module: str  # transformers name, e.g. "q_proj"
    linear: str  # our projection's path, e.g. "layers.3.self_attn.qkv_proj"
    rows: torch.Tensor  # (out,) int64: the projection's output row of each transformers row
    in_features: int

    @property
    def out_features(self) -> int:
        return self.rows.numel()


def lora_sites(model: nn.Module, targets: tuple[str, ...] = DEFAULT_TARGETS) -> dict[SiteKey, LoraSite]:
    """Every (layer, module) of the model that `targets` names and the layer has."""
    cfg = model.config
    gated = cfg.attn_output_gate
    sites: dict[SiteKey, LoraSite] = {}
    for i, layer in enumerate(model.layers):
        prefix = f"layers.{i}"
        candidates: dict[str, tuple[str, Linear, torch.Tensor]] = {}
        if layer.layer_type == "full_attention":
            qkv = layer.self_attn.qkv_proj
            q_rows = _part(qkv, 0)
            if gated:  # transformers' q_proj rows: per head [query (D) | gate (D)]
                heads, d = cfg.num_attention_heads, cfg.head_dim
                q_rows = torch.stack([_part(qkv, 0).view(heads, d), _part(qkv, 1).view(heads, d)], 1).reshape(-1)
            k_part, v_part = (2, 3) if gated else (1, 2)
            candidates["q_proj"] = (f"{prefix}.self_attn.qkv_proj", qkv, q_rows)
            candidates["k_proj"] = (f"{prefix}.self_attn.qkv_proj", qkv, _part(qkv, k_part))
            candidates["v_proj"] = (f"{prefix}.self_attn.qkv_proj", qkv, _part(qkv, v_part))
            o = layer.self_attn.o_proj
            candidates["o_proj"] = (f"{prefix}.self_attn.o_proj", o, _part(o, 0))
        else:
            inp = layer.linear_attn.in_proj
            for j, name in enumerate(("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")):
                candidates[name] = (f"{prefix}.linear_attn.in_proj", inp, _part(inp, j))
            out = layer.linear_attn.out_proj
            candidates["out_proj"] = (f"{prefix}.linear_attn.out_proj", out, _part(out, 0))
        gu, down = layer.mlp.gate_up_proj, layer.mlp.down_proj
        candidates["gate_proj"] = (f"{prefix}.mlp.gate_up_proj", gu, _part(gu, 0))
        candidates["up_proj"] = (f"{prefix}.mlp.gate_up_proj", gu, _part(gu, 1))
        candidates["down_proj"] = (f"{prefix}.mlp.down_proj", down, _part(down, 0))
        for module in targets:
            if module in candidates:
                path, linear, rows = candidates[module]
                sites[(i, module)] = LoraSite(i, module, path, rows, linear.in_features)
    unknown = set(targets) - set(DEFAULT_TARGETS) - set(LINEAR_ATTENTION_TARGETS)
    if unknown:
        raise ValueError(f"unknown LoRA target modules {sorted(unknown)}")
    return sites


def check_shapes(sites: dict[SiteKey, LoraSite], weights: LoraWeights) -> None:
    """ValueError naming the first site whose A (r, in) / B (out, r) does not fit this model."""
    for key, (a, b) in weights.modules.items():
        site = sites.get(key)
        if site is None:
            raise ValueError(f"the adapter targets {key[1]} of layer {key[0]}, which this model does not have")
        if tuple(a.shape) != (weights.rank, site.in_features) or tuple(b.shape) != (site.out_features, weights.rank):
            raise ValueError(
                f"{key[1]} of layer {key[0]}: adapter shapes A{tuple(a.shape)} B{tuple(b.shape)} do not fit this "
                f"model (A ({weights.rank}, {site.in_features}), B ({site.out_features}, {weights.rank})): "
                "was it trained for another base model?"
            )


def _part(linear: Linear, part: int) -> torch.Tensor:
    rows = linear.part_rows(part)
    return torch.arange(rows.start, rows.stop)


# ---------------------------------------------------------------------------------------------
# An adapter in memory
# ---------------------------------------------------------------------------------------------


@dataclass
class LoraWeights:
    """One adapter: per site A (r, in) and B (out, r) in float32; delta W = (alpha / r) B A."""

    rank: int
    alpha: float
    modules: dict[SiteKey, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def target_modules(self) -> list[str]:
        return sorted({m for _, m in self.modules})

    def to_peft(self, base_model: str = "") -> tuple[dict[str, torch.Tensor], dict]:
        """PEFT tensors and adapter_config (loads in peft / vLLM unchanged)."""
        tensors = {}
        for (layer, module), (a, b) in self.modules.items():
            key = f"{_PEFT_PREFIX}.{layer}.{_BLOCK[module]}.{module}"
            tensors[f"{key}.lora_A.weight"] = a.detach().float().contiguous()
            tensors[f"{key}.lora_B.weight"] = b.detach().float().contiguous()
        config = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.rank, "lora_alpha": self.alpha,
            "target_modules": self.target_modules, "lora_dropout": 0.0, "bias": "none",
            "use_rslora": False, "fan_in_fan_out": False, "base_model_name_or_path": base_model,
        }
        return tensors, config

    @classmethod
    def from_peft(cls, tensors: dict[str, torch.Tensor], config: dict) -> LoraWeights:
        if config.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"not a LoRA adapter: peft_type {config.get('peft_type')!r}")
        if config.get("use_rslora"):
            raise ValueError("rsLoRA adapters are not supported")
        rank = int(config["r"])
        modules: dict[SiteKey, list] = {}
        for key, tensor in tensors.items():
            parts = key.split(".")
            try:
                layer = int(parts[parts.index("layers") + 1])
            except (ValueError, IndexError):
                raise ValueError(f"unexpected adapter tensor {key!r}") from None
            if parts[-2] not in ("lora_A", "lora_B") or parts[-1] != "weight":
                raise ValueError(f"unexpected adapter tensor {key!r}")
            entry = modules.setdefault((layer, parts[-3]), [None, None])
            entry[0 if parts[-2] == "lora_A" else 1] = tensor.float()
        out = {}
        for site, (a, b) in modules.items():
            if a is None or b is None or a.shape[0] != rank or b.shape[1] != rank:
                raise ValueError(f"adapter tensors of {site} are incomplete or not of rank {rank}")
            out[site] = (a, b)
        return cls(rank, float(config.get("lora_alpha", rank)), out)

    def to_arrays(self) -> dict:
        """numpy arrays (and rank/alpha), for a zero-copy trip through a shared-memory store."""
        out = {"rank": self.rank, "alpha": self.alpha}
        for (layer, module), (a, b) in self.modules.items():
            out[f"{layer}|{module}|A"] = a.detach().float().numpy()
            out[f"{layer}|{module}|B"] = b.detach().float().numpy()
        return out

    @classmethod
    def from_arrays(cls, arrays: dict) -> LoraWeights:
        modules: dict[SiteKey, list] = {}
        for key, array in arrays.items():
            if key in ("rank", "alpha"):
                continue
            layer, module, which = key.split("|")
            entry = modules.setdefault((int(layer), module), [None, None])
            entry[0 if which == "A" else 1] = torch.from_numpy(array.copy())  # slots get their own copy anyway
        return cls(int(arrays["rank"]), float(arrays["alpha"]), {k: (a, b) for k, (a, b) in modules.items()})

    @classmethod
    def compose(cls, parts: list[tuple[LoraWeights, float]]) -> LoraWeights:
        """The exact sum of weighted adapters: ranks concatenated, scales folded into B."""
        rank = sum(w.rank for w, _ in parts)
        modules: dict[SiteKey, tuple[list, list]] = {}
        for weights, scale in parts:
            for site, (a, b) in weights.modules.items():
                As, Bs = modules.setdefault(site, ([], []))
                As.append(a)
                Bs.append(b * (scale * weights.scale))
        # Sites absent from some adapters get zero blocks, so every site has the full rank.
        out = {}
        for site, (As, Bs) in modules.items():
            a = torch.cat(As)
            b = torch.cat(Bs, dim=1)
            pad = rank - a.shape[0]
            if pad:
                a = torch.cat([a, a.new_zeros(pad, a.shape[1])])
                b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)
            out[site] = (a, b)
        return cls(rank, float(rank), out)


# ---------------------------------------------------------------------------------------------
# Training: one adapter with autograd
# ---------------------------------------------------------------------------------------------


class TrainableLora(nn.Module):
    """The trainable parameters of one adapter. `apply` adds its delta to a projection's output."""

    def __init__(self, sites: dict[SiteKey, LoraSite], rank: int, alpha: float, init: LoraWeights | None = None,
                 seed: int | None = None):
        """`seed`: draws the fresh A matrices (a job's seed: the same job trains the same adapter)."""
        super().__init__()
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        self.sites = sites
        self.a = nn.ParameterDict()
        self.b = nn.ParameterDict()
        self.by_linear: dict[str, list[tuple[str, LoraSite]]] = {}
        for site_key, site in sites.items():
            key = _param_key(site_key)
            if init is not None and site_key in init.modules:
                a, b = init.modules[site_key]
                a, b = a.clone().float(), b.clone().float()
            else:
                a = torch.empty(rank, site.in_features)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # as PEFT: A random, B zero
                b = torch.zeros(site.out_features, rank)
            self.a[key], self.b[key] = nn.Parameter(a), nn.Parameter(b)
            self.by_linear.setdefault(site.linear, []).append((key, site))

    def apply(self, linear: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        for key, site in self.by_linear.get(linear, ()):
            delta = (x.float() @ self.a[key].T) @ self.b[key].T * self.scale
            out = out.index_add(1, site.rows, delta.to(out.dtype))
        return out

    def export(self) -> LoraWeights:
        modules = {}
        for site_key in self.sites:
            key = _param_key(site_key)
            modules[site_key] = (self.a[key].detach().clone(), self.b[key].detach().clone())
        return LoraWeights(self.rank, self.alpha, modules)


def _param_key(site: SiteKey) -> str:
    return f"l{site[0]}_{site[1]}"


# ---------------------------------------------------------------------------------------------
# Serving: several adapters resident at once
# ---------------------------------------------------------------------------------------------


class AdapterSlots:
    """`num_slots` adapter slots of up to `max_rank` per site, stacked per projection.

    Loading copies an adapter into a slot's rows of the stacked buffers (sites it lacks stay
    zero); nothing else changes, so the other slots keep serving while one is written.
    """

    def __init__(self, model: nn.Module, num_slots: int, max_rank: int, targets: tuple[str, ...], dtype: torch.dtype):
        self.num_slots, self.max_rank = num_slots, max_rank
        self.sites = lora_sites(model, targets)
        self.a: dict[str, torch.Tensor] = {}  # linear path -> (slots, R, in)
        self.b: dict[str, torch.Tensor] = {}  # linear path -> (slots, out, R)
        self.columns: dict[SiteKey, slice] = {}
        by_linear: dict[str, list[LoraSite]] = {}
        for site in self.sites.values():
            by_linear.setdefault(site.linear, []).append(site)
        for path, sites in by_linear.items():
            linear = model.get_submodule(path)
            total = max_rank * len(sites)
            self.a[path] = torch.zeros(num_slots, total, linear.in_features, dtype=dtype)
            self.b[path] = torch.zeros(num_slots, linear.weight.shape[0], total, dtype=dtype)
            for j, site in enumerate(sites):
                self.columns[(site.layer, site.module)] = slice(j * max_rank, (j + 1) * max_rank)

    def check(self, weights: LoraWeights) -> None:
        """Raise ValueError unless the adapter fits a slot: rank, targets and every A/B shape
        (an adapter trained for another base model fails here, not in the middle of a load)."""
        if weights.rank > self.max_rank:
            raise ValueError(f"adapter rank {weights.rank} exceeds max_lora_rank {self.max_rank}")
        missing = set(weights.modules) - set(self.sites)
        if missing:
            raise ValueError(f"adapter targets modules this server does not adapt: {sorted(missing)[:4]}")
        check_shapes(self.sites, weights)

    def load(self, slot: int, weights: LoraWeights) -> None:
        """Write an adapter into a slot (scale folded into B); `check` first. Writes nothing
        but `slot`'s part of each buffer, so it may run on another thread beside a step whose
        rows do not use `slot` (LoraBatch reads only its groups' slots)."""
        self.check(weights)
        with torch.no_grad():
            for path in self.a:
                self.a[path][slot].zero_()
                self.b[path][slot].zero_()
            for site_key, (a, b) in weights.modules.items():
                site, cols = self.sites[site_key], self.columns[site_key]
                r = a.shape[0]
                self.a[site.linear][slot, cols.start : cols.start + r] = a.to(self.a[site.linear].dtype)
                scaled = (b * weights.scale).to(self.b[site.linear].dtype)
                self.b[site.linear][slot, :, cols.start : cols.start + r].index_copy_(0, site.rows, scaled)


@dataclass
class LoraBatch:
    """Which rows of this step's flat batch use which slot (rows of no adapter are absent)."""

    slots: AdapterSlots
    groups: list[tuple[int, torch.Tensor | None]]  # (slot, row indices, or None = every row)

    def apply(self, linear: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        a = self.slots.a.get(linear)
        if a is None:
            return out
        return lora_delta(x, out, a, self.slots.b[linear], self.groups)
