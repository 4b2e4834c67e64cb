"""Owned experts: with expert parallel degree K, each rank holds the weights, gradients and AdamW
state of E/K routed experts per MoE layer, beside the DeepSpeed engine that holds the rest.

Ranks [g*K, (g+1)*K) form expert-parallel group g: they exchange tokens all-to-all
(model/parallel.py) and rank g*K + j computes experts [j*E/K, (j+1)*E/K). Ranks j, j+K, j+2K, ...
own the same experts: that is expert-data-parallel group j, over which those experts' gradients are
summed. Every other parameter stays with DeepSpeed (ZeRO 0-3 over all ranks). The update equals the
single-process one:
- gradients: a rank's expert slice receives, through the all-to-all backward, the gradients of every
  token its EP group routed there; summed over the expert-data-parallel group that is every rank's
  tokens, and divided by the world size it is the data-parallel mean DeepSpeed takes of the rest
  (DeepSpeed's engine.backward has already divided the loss by the accumulation steps);
- clipping: by the norm of all gradients. The ZeRO optimizer's own norm is widened to include the
  experts' (`hook_global_norm`), so DeepSpeed clips its part by the global norm, and `step` clips
  the experts by the same factor;
- AdamW with DeepSpeed's hyperparameters and learning rate of the step (torch's AdamW, as
  DeepSpeed runs on CPU with torch_adam);
- memory: the D = world / K ranks of an expert-data-parallel group split those experts' fp32
  masters, gradients and moments into D flat pieces (ZeRO-2 within the group): the gradients are
  reduce-scattered (an all-to-all and a sum), each rank updates its piece, and the new weights are
  all-gathered into the compute copies every rank's forward uses. Per owned parameter a rank holds
  w bytes of compute weight (w: the compute dtype's size) and 16/D of fp32 master, gradient and
  moments: w + 16/D instead of w + 16 (fp32 with D = 1: 16, the master is the compute weight).

Why beside DeepSpeed and not through its MoE parameter groups (`allreduce=False`, `group_name`):
DeepSpeed refuses its native MoE under ZeRO-3 ("MoE not supported with Stage 3"), and its groups
would tie the experts' optimizer state to DeepSpeed's checkpoint layout, which cannot change world
size. Here the experts are plain tensors the engine never sees (no ZeRO hooks, no broadcast from
rank 0), checkpointed as each rank's pieces (`save`) that `ExpertCheckpoint` reads back per expert,
so a checkpoint loads at another EP degree and group size and `checkpoints.load_model_state`
reassembles the full model for export.

Under bf16 the module computes with a bf16 copy of each owned tensor and the fp32 masters stay here.

Test: `pytest tests/orchestrator/test_orch_expert_shard.py`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from model.moe import MoE
from model.parallel import apply_expert_parallel, expert_slice
from orchestrator.reshard import flat_span

EXPERT_DIR = "experts"  # in a checkpoint folder: one file per rank (its piece of its slice), and the layout


def expert_groups(world: int, ep: int) -> tuple[list, list]:
    """(expert-parallel groups, expert-data-parallel groups); every rank must create both, in order."""
    ep_groups = [dist.new_group(list(range(s, s + ep))) for s in range(0, world, ep)]
    edp_groups = [dist.new_group(list(range(j, world, ep))) for j in range(ep)]
    return ep_groups, edp_groups


class ExpertShard:
    """This rank's routed experts of `model` (every MoE layer, MTP's included) and their optimizer.

    The owned experts' compute weights are whole on every rank of their expert-data-parallel group
    (the forward needs them); their fp32 masters, gradients and AdamW moments are split into D equal
    flat pieces over that group (D = world / K, ZeRO-2 for the experts, as DeepSpeed-MoE and Megatron's
    distributed optimizer do): `reduce` reduce-scatters the gradients, `step` updates this rank's piece
    and all-gathers the new weights. With D = 1 the piece is the whole slice."""

    def __init__(self, model: torch.nn.Module, *, ep: int, rank: int, world: int, lr: float,
                 betas: tuple[float, float], weight_decay: float, grad_clip: float, eps: float = 1e-8,
                 dtype: torch.dtype = torch.float32):
        if world % ep:
            raise ValueError(f"expert parallel {ep} does not divide the world size {world}")
        self.ep, self.rank, self.world, self.grad_clip = ep, rank, world, grad_clip
        self.ep_groups, self.edp_groups = expert_groups(world, ep)
        self.part = rank % ep  # which slice of every layer's experts this rank owns
        self.dp, self.piece_index = world // ep, rank // ep  # D, and this rank's place in its EDP group
        apply_expert_parallel(model, self.ep_groups[rank // ep], shard_weights=True)
        self.compute: dict[str, torch.Tensor] = {}  # what the module computes with, by state-dict key
        self.master: dict[str, torch.Tensor] = {}  # this rank's flat fp32 piece, which the optimizer updates
        self.n_experts: dict[str, int] = {}
        for mname, moe in ((n, m) for n, m in model.named_modules() if isinstance(m, MoE)):
            for w in ("w1", "w2", "w3"):
                p = moe.experts._parameters.pop(w)  # no longer a parameter: DeepSpeed never sees it
                key = f"{mname}.experts.{w}"
                comp = p.detach().to(dtype).clone().requires_grad_(True)
                setattr(moe.experts, w, comp)
                self.compute[key] = comp
                if self.dp == 1 and dtype == torch.float32:  # the master is the compute weight itself
                    self.master[key] = comp.detach().view(-1).requires_grad_(True)
                else:
                    self.master[key] = self._piece(p.detach().float()).clone().requires_grad_(True)
                self.n_experts[key] = moe.n_experts
        self.optimizer = torch.optim.AdamW(list(self.master.values()), lr=lr, betas=betas, eps=eps,
                                           weight_decay=weight_decay, fused=True)
        self.norm = 0.0  # the experts' gradient norm of the last reduce()

    def _piece(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's flat piece of a whole owned tensor (the last piece zero-padded)."""
        n = math.ceil(t.numel() / self.dp)
        return F.pad(t.reshape(-1), (0, n * self.dp - t.numel())).narrow(0, n * self.piece_index, n)

    def _whole(self, key: str, piece: torch.Tensor) -> torch.Tensor:
        """The whole owned tensor `key` from every EDP rank's `piece` (all-gather)."""
        if self.dp == 1:
            return piece.reshape(self.compute[key].shape)
        parts = [torch.empty_like(piece) for _ in range(self.dp)]
        dist.all_gather(parts, piece.contiguous(), group=self.edp_groups[self.part])
        return torch.cat(parts)[:self.compute[key].numel()].view(self.compute[key].shape)

    # --- one optimizer step: reduce (before engine.step), then step (after) --------------------

    def reduce(self) -> float:
        """Sum the owned gradients over the expert-data-parallel group (each rank keeps its piece of
        the sum: a reduce-scatter, as all-to-all, which gloo and NCCL both run), divide by the world
        size, and compute the experts' gradient norm over all ranks (kept for the global clip)."""
        sq = torch.zeros((), dtype=torch.float64)
        for key, comp in self.compute.items():
            master = self.master[key]
            g = comp.grad.float() if comp.grad is not None else torch.zeros(comp.shape)
            comp.grad = None
            if self.dp > 1:
                n = master.numel()
                sent = F.pad(g.reshape(-1), (0, n * self.dp - g.numel()))
                got = torch.empty_like(sent)
                dist.all_to_all_single(got, sent, group=self.edp_groups[self.part])
                g = got.view(self.dp, n).sum(0)
            g = g.reshape(-1) / self.world
            master.grad = g
            sq += g.double().pow(2).sum()
        if self.world > 1:  # the other pieces and slices live on the other ranks
            dist.all_reduce(sq)
        self.norm = math.sqrt(sq.item())
        return self.norm

    def step(self, lr: float, global_norm: float | None) -> None:
        """AdamW on this rank's pieces at learning rate `lr`, clipped as DeepSpeed clips by
        `global_norm`; then the compute weights are gathered whole from the group's new pieces."""
        if self.grad_clip > 0 and global_norm is not None and math.isfinite(global_norm):
            clip = (global_norm + 1e-6) / self.grad_clip  # DeepSpeed ZeRO's formula
            if clip > 1:
                for m in self.master.values():
                    m.grad.div_(clip)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for key, comp in self.compute.items():
                master = self.master[key]
                if master.data_ptr() != comp.data_ptr():
                    comp.copy_(self._whole(key, master.detach().to(comp.dtype)))

    def hook_global_norm(self, engine) -> None:
        """Make the DeepSpeed engine's gradient norm (its clipping and get_global_grad_norm) the norm
        of all gradients: its own partitions' and the owned experts' (from the last `reduce`)."""
        from deepspeed.runtime.utils import clip_grad_norm_

        opt, stage = engine.optimizer, engine.zero_optimization_stage()
        if stage in (1, 2):
            inner = opt.scaled_global_norm

            def scaled_global_norm(norm_type=2):
                own = inner(norm_type)
                return torch.sqrt(own.float() ** 2 + (self.norm * opt.loss_scale) ** 2)
            opt.scaled_global_norm = scaled_global_norm
        elif stage == 3:
            inner = opt._get_norm_groups

            def get_norm_groups():
                groups = inner()
                return [*groups, torch.tensor(self.norm * opt.loss_scale, dtype=torch.float, device=groups[0].device)]
            opt._get_norm_groups = get_norm_groups
        else:  # ZeRO 0: the engine clips the module's (already averaged) gradients itself
            def clip_fp32_gradients():
                params = [p for p in engine.module.parameters() if p.grad is not None]
                own = clip_grad_norm_(params, max_norm=float("inf"))  # the norm only
                total = math.sqrt(float(own) ** 2 + self.norm ** 2)
                coef = engine.gradient_clipping() / (total + 1e-6)
                if coef < 1:
                    for p in params:
                        p.grad.mul_(coef)
                engine._global_grad_norm = total
            engine.clip_fp32_gradients = clip_fp32_gradients

    def gathered(self) -> dict[str, torch.Tensor]:
        """Every expert of every layer (the compute copies), gathered over this rank's EP group: the
        whole model's expert tensors by state-dict key, for a weight sync. Every rank calls it."""
        group, out = self.ep_groups[self.rank // self.ep], {}
        for key, comp in self.compute.items():
            parts = [torch.empty_like(comp) for _ in range(self.ep)]
            dist.all_gather(parts, comp.detach().contiguous(), group=group)
            out[key] = torch.cat(parts)
        return out

    # --- memory ---------------------------------------------------------------------------------

    def state_bytes(self) -> dict[str, int]:
        """Bytes this rank holds for its experts: parameters (master pieces and compute copies),
        gradients, optimizer state."""
        params = sum(t.numel() * t.element_size() for t in self.master.values())
        params += sum(c.numel() * c.element_size() for k, c in self.compute.items() if c.data_ptr() != self.master[k].data_ptr())
        grads = sum(t.numel() * 4 for t in self.master.values())  # fp32 gradient pieces during the step
        optim = sum(v.numel() * v.element_size() for s in self.optimizer.state.values() for v in s.values()
                    if torch.is_tensor(v) and v.dim() > 0)
        if not self.optimizer.state:  # before the first step: AdamW's two moments to come
            optim = 2 * sum(t.numel() * 4 for t in self.master.values())
        return {"parameters": params, "gradients": grads, "optimizer": optim}

    # --- checkpoints: one file per rank's pieces, loadable at any EP degree and group size ------

    def save(self, folder: Path) -> None:
        """This rank's pieces of its owned experts and of their AdamW state into
        `folder/experts/part{j}-of{K}.piece{i}-of{D}.pt`, and (rank 0) the layout. Call on every rank;
        nothing is gathered: each rank writes what it holds, as ZeRO's per-rank optimizer files do."""
        d = Path(folder) / EXPERT_DIR
        d.mkdir(parents=True, exist_ok=True)
        state = {}
        for key, master in self.master.items():
            s = self.optimizer.state.get(master, {})
            state[key] = {"weight": master.detach(), **{k: s[k] for k in ("exp_avg", "exp_avg_sq") if k in s}}
        step = next((float(s["step"]) for s in self.optimizer.state.values() if "step" in s), 0.0)
        torch.save({"tensors": state, "step": step}, piece_file(folder, self.part, self.ep, self.piece_index, self.dp))
        if self.rank == 0:
            shapes = {k: [self.n_experts[k], *c.shape[1:]] for k, c in self.compute.items()}
            (d / "layout.json").write_text(json.dumps({"expert_parallel": self.ep, "pieces": self.dp,
                                                       "n_experts": self.n_experts, "shapes": shapes}))

    def load(self, folder: Path) -> None:
        """Restore the owned experts from a checkpoint saved at any EP degree that divides E and any
        expert-data-parallel size, one tensor at a time."""
        saved = ExpertCheckpoint(folder)
        for key in self.master:
            self.load_state({key: saved.read(key, lambda n: expert_slice(n, self.part, self.ep)), "step": saved.step}, keys=[key])

    def load_state(self, parts: dict, keys=None) -> None:
        """Set the owned experts `keys` (default all) from `parts` ({key: {"weight", and "exp_avg",
        "exp_avg_sq" once stepped}, "step"}, each tensor this rank's whole slice: `owned_slice`); this
        rank keeps its piece."""
        with torch.no_grad():
            for key in (keys if keys is not None else self.master):
                t, master = parts[key], self.master[key]
                master.copy_(self._piece(t["weight"]))
                if "exp_avg" in t:
                    self.optimizer.state[master] = {"step": torch.tensor(parts["step"]),
                                                    **{k: self._piece(t[k]).clone() for k in ("exp_avg", "exp_avg_sq")}}
                comp = self.compute[key]
                if comp.data_ptr() != master.data_ptr():
                    comp.copy_(t["weight"])


def piece_file(folder: Path, j: int, k: int, i: int, d: int) -> Path:
    """The file of piece `i` of `d` of slice `j` of `k` of a checkpoint's owned experts."""
    return Path(folder) / EXPERT_DIR / f"part{j}-of{k}.piece{i}-of{d}.pt"


def owned_slice(shard: ExpertShard, n_experts: int) -> slice:
    """The experts of a layer with `n_experts` routed experts that `shard`'s rank owns."""
    return expert_slice(n_experts, shard.part, shard.ep)


def expert_layout(folder: Path) -> dict | None:
    path = Path(folder) / EXPERT_DIR / "layout.json"
    return json.loads(path.read_text()) if path.is_file() else None


class ExpertCheckpoint:
    """The owned experts of a checkpoint folder, read lazily: each file memory-mapped once, each
    tensor assembled from the pieces that hold the experts asked for. Layouts: `pieces` D (the
    expert-data-parallel size it was saved at; each file a flat piece of a slice), or, from
    checkpoints saved before pieces, one whole file per slice (`part{j}-of{K}.pt`)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        layout = expert_layout(self.folder)
        if layout is None:
            raise FileNotFoundError(f"{self.folder / EXPERT_DIR / 'layout.json'}: not a checkpoint with owned experts")
        self.k, self.d = layout["expert_parallel"], layout.get("pieces")
        self.n_experts, self.shapes = layout["n_experts"], layout.get("shapes", {})
        self.opened: dict[Path, dict] = {}
        for f in self.files():
            if not f.is_file():
                raise FileNotFoundError(f"{f}: a part of the checkpoint's experts is missing")

    def files(self) -> list[Path]:
        if self.d is None:
            return [self.folder / EXPERT_DIR / f"part{j}-of{self.k}.pt" for j in range(self.k)]
        return [piece_file(self.folder, j, self.k, i, self.d) for j in range(self.k) for i in range(self.d)]

    def _open(self, f: Path) -> dict:
        if f not in self.opened:
            self.opened[f] = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
        return self.opened[f]

    @property
    def step(self) -> float:
        return float(self._open(self.files()[0])["step"])

    def read(self, key: str, select=None, names=None) -> dict[str, torch.Tensor]:
        """{"weight", and "exp_avg", "exp_avg_sq" once stepped} (or only `names`): experts
        `select(n_experts)` (a slice; all when None) of `key`, each a new tensor."""
        n = self.n_experts[key]
        want = slice(*(select(n) if select else slice(0, n)).indices(n))
        out: dict[str, list] = {}
        for j in range(self.k):
            have = expert_slice(n, j, self.k)
            lo, hi = max(want.start, have.start), min(want.stop, have.stop)
            if lo < hi:
                for name, t in self._rows(key, j, have, lo - have.start, hi - have.start, names).items():
                    out.setdefault(name, []).append(t)
        return {name: torch.cat(ts) for name, ts in out.items()}

    def _rows(self, key: str, j: int, have: slice, a: int, b: int, names) -> dict[str, torch.Tensor]:
        """Experts [a, b) of slice `j` (experts `have`) of `key`, from the pieces holding them."""
        def tensors(f: Path) -> dict:
            return {n: t for n, t in self._open(f)["tensors"][key].items() if names is None or n in names}

        if self.d is None:
            return {name: t[a:b] for name, t in tensors(self.files()[j]).items()}
        rows = self.shapes[key][1:]
        size = math.prod(rows)
        n = math.ceil((have.stop - have.start) * size / self.d)  # a piece's length (the last one padded)
        pieces = [tensors(piece_file(self.folder, j, self.k, i, self.d)) for i in range(self.d)]
        return {name: flat_span([p[name] for p in pieces], [n] * self.d, a * size, b * size).view(b - a, *rows)
                for name in pieces[0]}


def experts_complete(folder: Path) -> bool:
    """Whether `folder` holds owned experts with every file of their layout present."""
    try:
        ExpertCheckpoint(folder)
        return True
    except FileNotFoundError:
        return False
