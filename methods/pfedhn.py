"""pFedHN (Shamsian et al., ICML 2021) for Vision Transformers: a hypernetwork generates each client's personal part.

The server keeps a learned embedding per client and a hypernetwork that turns
it into the client's copy of the *generated* tensors. Generating a whole ViT
with the paper's one linear output per tensor is infeasible (about 2.2 billion
hypernetwork weights for ViT-S), so by default the hypernetwork generates a
personal part a ViT can afford in full: every normalization layer's affine
parameters (the small per-block part, chosen by module type) and, in variant
`hn`, the classifier head; about 58k values at ViT-S/16 with 100 classes.
Everything else is FedAvg. The generator is the paper's own:

    h       = MLP(e_client)                       the paper's MLP body
    tensor  = Linear_tensor(h).view(shape)        one Linear(hidden_dim, numel) per generated tensor

The output layers' biases are the shared base (they start at the model's own
initial weights) and their weights start at zero, so every client starts
exactly at the model (no random deviation). After local training on the
generated weights a client returns them; the server pushes
`delta = sent - after` back through the generator (a vector-Jacobian product)
and takes one SGD step per client update, as each arrives, with the paper's
optimizer (lr 1e-2, momentum 0.9, weight decay 1e-3, gradient norm clipped to
50, embedding lr = lr) on the whole hypernetwork: base, body, output weights
and client embeddings. The paper trains for about 100 visits per client;
`step=round` takes one step per round on the clients' mean gradient instead,
for comparison.

A large `method.target` (e.g. every attention weight) needs `chunk_size`: one
generator emits fixed-size chunks gated by learned chunk embeddings, on top
of a full-size base, so the hypernetwork does not grow with the target. That
is outside the paper's regime (its learnable deviation is rank-limited and
learns little in a benchmark's budget). Variant `pc` (pFedHN-PC) keeps the
classifier head on the client.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..benchmark.config import MethodConfig
from ..benchmark.errors import UserError
from .base import ClientTrainer, ClientUpdate, Method, SearchTrial, register
from .structure import head_entries, norm_entries

VARIANTS = ("hn", "pc")
STEPS = ("client", "round")
MAX_OUTPUT_WEIGHTS = 50_000_000  # per-tensor outputs beyond this (200 MB in float32) need chunk_size


@dataclass
class PFedHNOptions(MethodConfig):
    """Options of pFedHN (`method.*`)."""

    norms: bool = True  # generate every normalization layer's affine parameters (the per-block personal part)
    target: list[str] = field(default_factory=list)  # glob patterns of further generated entries (large: chunk_size)
    variant: str = "hn"  # hn: the classifier head is generated too (the paper); pc: the head stays on the client
    embed_dim: int = 0  # client embedding size; 0 = 1 + num_clients // 4 (the paper's rule)
    hidden_dim: int = 100  # width of the MLP body (and of the chunk embeddings)
    n_hidden: int = 3  # hidden->hidden layers of the MLP body after its input layer
    chunk_size: int = 0  # 0: one Linear(hidden_dim, numel) per tensor (the paper); > 0: one generator of chunks
    step: str = "client"  # client: one server step per client update (the paper); round: one on the round's mean
    hn_lr: float = 1e-2  # SGD learning rate of the hypernetwork and its base (the paper's)
    embed_lr: float = 0.0  # SGD learning rate of the client embeddings; 0 = hn_lr (the paper; its pc runs: 5e-2)
    momentum: float = 0.9  # SGD momentum of the server optimizer
    weight_decay: float = 1e-3  # SGD weight decay of the server optimizer
    max_grad_norm: float = 50.0  # clip each server step's gradient norm; 0 = off
    novel_rounds: int = 10  # embedding-fit steps for held-out clients (data.novel_clients) after the last round

    def validate(self) -> None:
        """Range checks; a UserError names the key."""

        def require(ok: bool, key: str, value: Any, allowed: str) -> None:
            if not ok:
                raise UserError(f"bad value for method.{key}: {value!r} ({allowed})")

        require(all(p.strip() for p in self.target), "target", self.target,
                "glob patterns over parameter names, e.g. blocks.*.attn.qkv.weight")
        require(self.variant in VARIANTS, "variant", self.variant, f"choose one of: {', '.join(VARIANTS)}")
        require(self.step in STEPS, "step", self.step, f"choose one of: {', '.join(STEPS)}")
        require(self.embed_dim >= 0, "embed_dim", self.embed_dim, "must be >= 1, or 0 for 1 + num_clients // 4")
        for key in ("hidden_dim", "novel_rounds"):
            require(getattr(self, key) >= 1, key, getattr(self, key), "must be >= 1")
        require(self.n_hidden >= 0, "n_hidden", self.n_hidden, "must be >= 0")
        require(self.chunk_size >= 0, "chunk_size", self.chunk_size, "must be >= 1, or 0 for one output per tensor")
        require(self.hn_lr > 0, "hn_lr", self.hn_lr, "must be > 0")
        require(self.embed_lr >= 0, "embed_lr", self.embed_lr, "must be > 0, or 0 for hn_lr")
        require(0 <= self.momentum < 1, "momentum", self.momentum, "must be in [0, 1)")
        require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        require(self.max_grad_norm >= 0, "max_grad_norm", self.max_grad_norm, "must be >= 0 (0 = off)")


class Hypernetwork(nn.Module):
    """Client embedding -> MLP -> the generated tensors: the paper's per-tensor outputs, or chunks of a large target.

    `chunk_size = 0`: one `Linear(hidden_dim, numel)` per generated tensor; its
    bias is the tensor's shared base. `chunk_size > 0`: a full-size flat base
    plus one bias-free `Linear(hidden_dim, chunk_size)` applied to `h * c_j`,
    `c_j` a learned embedding of chunk j. Either way the output weights start
    at zero, so every client starts at the base.
    """

    def __init__(
        self,
        num_clients: int,
        shapes: Mapping[str, Sequence[int]],
        *,
        embed_dim: int,
        hidden_dim: int,
        n_hidden: int,
        chunk_size: int = 0,
    ):
        super().__init__()
        self.shapes = {name: torch.Size(shape) for name, shape in shapes.items()}
        self.sizes = [s.numel() for s in self.shapes.values()]
        self.num_generated = sum(self.sizes)
        self.chunk_size = chunk_size
        self.embeddings = nn.Embedding(num_clients, embed_dim)  # N(0, 1), as in the paper
        layers: list[nn.Module] = [nn.Linear(embed_dim, hidden_dim)]
        for _ in range(n_hidden):
            layers += [nn.ReLU(), nn.Linear(hidden_dim, hidden_dim)]
        self.body = nn.Sequential(*layers)
        if chunk_size:
            self.num_chunks = math.ceil(self.num_generated / chunk_size)
            self.chunk_embeddings = nn.Parameter(torch.randn(self.num_chunks, hidden_dim))
            self.generator = nn.Linear(hidden_dim, chunk_size, bias=False)  # the base is the common pattern
            self.base = nn.Parameter(torch.zeros(self.num_generated))
            with torch.no_grad():  # E ||h * c_j||^2 = 1 over clients and chunks, whatever the widths
                h = self.body(self.embeddings.weight)
                features = float((h.square().mean(0) * self.chunk_embeddings.square().mean(0)).sum())
                if features > 0:
                    self.chunk_embeddings.mul_(1 / math.sqrt(features))
            outputs = [self.generator]
        else:
            self.num_chunks = 0
            self.outputs = nn.ModuleList(nn.Linear(hidden_dim, n) for n in self.sizes)
            outputs = list(self.outputs)
        with torch.no_grad():
            for layer in outputs:
                layer.weight.zero_()  # no initial deviation: every client starts at the base

    def generate(self, embedding: torch.Tensor) -> dict[str, torch.Tensor]:
        """The generated tensors from one client embedding (shape `(embed_dim,)`)."""
        h = self.body(embedding)
        if self.chunk_size:
            chunks = self.generator(self.chunk_embeddings * h)  # (num_chunks, chunk_size)
            pieces = (self.base + chunks.reshape(-1)[: self.num_generated]).split(self.sizes)
        else:
            pieces = [layer(h) for layer in self.outputs]
        return {name: piece.view(shape) for (name, shape), piece in zip(self.shapes.items(), pieces)}

    def forward(self, client: int) -> dict[str, torch.Tensor]:
        return self.generate(self.embeddings.weight[client])

    def base_parameters(self) -> list[nn.Parameter]:
        """The shared base, in the order of the generated tensors: the output biases (or the flat base)."""
        return [self.base] if self.chunk_size else [layer.bias for layer in self.outputs]

    def base_flat(self) -> torch.Tensor:
        """The base as one flat vector, every generated tensor in order."""
        return torch.cat([p.detach().reshape(-1) for p in self.base_parameters()])

    def generator_parameters(self) -> list[nn.Parameter]:
        """What maps an embedding to a deviation from the base: neither the base nor the embeddings."""
        excluded = {id(p) for p in self.base_parameters()} | {id(self.embeddings.weight)}
        return [p for p in self.parameters() if id(p) not in excluded]

    @torch.no_grad()
    def set_base(self, targets: Mapping[str, torch.Tensor]) -> None:
        """Start the base at the given tensors (the model's initial weights)."""
        flat = torch.cat([targets[name].reshape(-1) for name in self.shapes])
        for p, piece in zip(self.base_parameters(), flat.split([p.numel() for p in self.base_parameters()])):
            p.copy_(piece.view(p.shape).to(p.dtype))

    def num_generator_parameters(self) -> int:
        return sum(p.numel() for p in self.generator_parameters())


# -- the server math --------------------------------------------------------------


def vector_jacobian(
    generated: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], inputs: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """`J^T delta`: the generated tensors' Jacobian with respect to `inputs`, applied to `delta`.

    With `delta = sent - after local training`, an SGD step along this moves the
    generated weights towards the client's trained ones (the pFedHN update).
    """
    names = list(generated)
    grads = torch.autograd.grad(
        [generated[n] for n in names], list(inputs),
        grad_outputs=[delta[n].to(generated[n].dtype) for n in names], allow_unused=True,
    )
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]


def client_gradient(hn: Hypernetwork, client: int, delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One client's `J^T delta` by parameter name of `hn` (the paper's gradient for the client it visits)."""
    names, params = zip(*hn.named_parameters())
    with torch.enable_grad():
        grads = vector_jacobian(hn(client), delta, params)
    return dict(zip(names, grads))


class RoundGradient:
    """The round-averaged server gradient (`step = "round"`), summed client by client as updates arrive.

    Shared parameters (base, body, outputs): the sample-weighted mean over the
    round's clients of `J_i^T delta_i`; client embeddings: each client's row
    gets its own, undivided `J_i^T delta_i`. Every product is taken at the
    parameters that generated what the clients were sent (nothing steps until
    `result`).
    """

    def __init__(self, hn: Hypernetwork):
        self.hn = hn
        self.table = hn.embeddings.weight
        self.shared = [p for p in hn.parameters() if p is not self.table]
        self.grads = [torch.zeros_like(p) for p in self.shared]
        self.table_grad = torch.zeros_like(self.table)
        self.total = 0.0  # summed weights

    def add(self, client: int, delta: Mapping[str, torch.Tensor], weight: float) -> None:
        """One client's `J^T delta`, with its weight."""
        with torch.enable_grad():
            row = self.table[client]
            *shared_grads, row_grad = vector_jacobian(self.hn.generate(row), delta, [*self.shared, row])
        for acc, g in zip(self.grads, shared_grads):
            acc.add_(g, alpha=float(weight))
        self.table_grad[client] += row_grad
        self.total += float(weight)

    def result(self) -> dict[str, torch.Tensor]:
        """The gradient by parameter name of the hypernetwork."""
        by_param = {id(p): g / self.total for p, g in zip(self.shared, self.grads)}
        by_param[id(self.table)] = self.table_grad
        return {name: by_param[id(p)] for name, p in self.hn.named_parameters()}


def round_gradients(
    hn: Hypernetwork,
    clients: Sequence[int],
    deltas: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
) -> dict[str, torch.Tensor]:
    """`RoundGradient` over a whole round at once, by parameter name of `hn`."""
    acc = RoundGradient(hn)
    for client, delta, weight in zip(clients, deltas, weights):
        acc.add(client, delta, weight)
    return acc.result()


def clip_and_step(params: Sequence[nn.Parameter], grads: Sequence[torch.Tensor], max_norm: float,
                  optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """Install `grads`, clip their total norm to `max_norm` (0 = off), step every optimizer."""
    for p, g in zip(params, grads):
        p.grad = g
    if max_norm > 0:
        torch.nn.utils.clip_grad_norm_(list(params), max_norm)
    for opt in optimizers:
        opt.step()
    for p in params:
        p.grad = None


@register("pfedhn")
class PFedHN(Method):
    """pFedHN (Shamsian et al., 2021): a server hypernetwork generates each client's head and norms."""

    Options = PFedHNOptions
    options: PFedHNOptions

    def __init__(self, options: PFedHNOptions | None = None):
        super().__init__(options)
        self.hn: Hypernetwork | None = None
        self.targets: list[str] = []
        self._round: RoundGradient | None = None

    # -- which parameters are personal ----------------------------------------------
    def personal_entries(self, model: nn.Module) -> set[str]:
        return head_entries(model) if self.options.variant == "pc" else set()

    # -- held-out (novel) clients -----------------------------------------------------
    def fit_held_out(self, clients: Sequence[int], train_client: ClientTrainer) -> None:
        """Fit only the held-out clients' embeddings; the hypernetwork is never stepped.

        Each step is a round restricted to the novel clients: local training on the
        generated weights (the engine's own step), then `J^T delta` with respect to
        the client's embedding alone, clipped, and an SGD step on the embeddings.
        """
        assert self.hn is not None
        opts = self.options
        clients = list(clients)
        table = self.hn.embeddings.weight
        novel = nn.Parameter(table.detach()[clients].clone())
        optimizer = torch.optim.SGD([novel], lr=self.embed_optimizer.param_groups[0]["lr"], momentum=opts.momentum,
                                    weight_decay=opts.weight_decay)
        for step in range(1, opts.novel_rounds + 1):
            updates = [train_client(c, step) for c in clients]
            grad = torch.zeros_like(novel)
            for i, update in enumerate(updates):
                with torch.enable_grad():
                    row = novel[i]
                    (grad[i],) = vector_jacobian(self.hn.generate(row), self._delta(update), [row])
            clip_and_step([novel], [grad], opts.max_grad_norm, [optimizer])
            with torch.no_grad():
                table[clients] = novel.detach()  # the next broadcast generates from the fitted rows

    # -- the server ------------------------------------------------------------------
    def server_init(self, model: nn.Module, shared: Mapping[str, torch.Tensor], num_clients: int) -> None:
        opts = self.options
        self.targets = self._select_targets(model, shared)
        super().server_init(model, {n: t for n, t in shared.items() if n not in set(self.targets)}, num_clients)
        initial = {n: shared[n].detach().float() for n in self.targets}
        size = sum(t.numel() for t in initial.values())
        if not opts.chunk_size and size * opts.hidden_dim > MAX_OUTPUT_WEIGHTS:
            raise UserError(
                f"bad value for method.target: {size:,} generated values need {size * opts.hidden_dim:,} output"
                f" weights at hidden_dim={opts.hidden_dim} (at most {MAX_OUTPUT_WEIGHTS:,}); set method.chunk_size"
                " (e.g. 2048) to generate it in chunks")
        self.hn = Hypernetwork(
            num_clients, {n: shared[n].shape for n in self.targets},
            embed_dim=opts.embed_dim or 1 + num_clients // 4, hidden_dim=opts.hidden_dim,
            n_hidden=opts.n_hidden, chunk_size=opts.chunk_size,
        ).to(next(iter(initial.values())).device)
        self.hn.set_base(initial)
        table = self.hn.embeddings.weight
        # The paper's optimizer: one SGD over the hypernetwork (its output biases, the base, included),
        # the embeddings at their own learning rate.
        common = {"momentum": opts.momentum, "weight_decay": opts.weight_decay}
        self.hn_optimizer = torch.optim.SGD([p for p in self.hn.parameters() if p is not table], lr=opts.hn_lr,
                                            **common)
        self.embed_optimizer = torch.optim.SGD([table], lr=opts.embed_lr or opts.hn_lr, **common)

    def _select_targets(self, model: nn.Module, shared: Mapping[str, torch.Tensor]) -> list[str]:
        opts = self.options
        names = list(model.state_dict(keep_vars=True))
        params = dict(model.named_parameters())
        # Variant hn generates the classifier too, as the paper generates every layer.
        chosen: set[str] = head_entries(model) if opts.variant == "hn" else set()
        if opts.norms:
            chosen |= {n for n in norm_entries(model) if n in params}  # affine parameters, not running statistics
        for pattern in opts.target:
            matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
            if not matched:
                examples = ", ".join(n for n in names if n.endswith(".weight"))[:200]
                raise UserError(f"bad value for method.target: {pattern!r} matches no model entry (e.g. {examples})")
            chosen.update(matched)
        if not chosen:
            raise UserError("bad value for method.norms: false, with variant pc and no method.target nothing is"
                            " generated; keep method.norms=true or give method.target")
        personal = sorted(n for n in chosen if n not in shared)
        if personal:
            raise UserError(f"bad value for method.target: it matches personal entries ({', '.join(personal)}),"
                            " which the server cannot generate")
        not_float = sorted(n for n in chosen if not shared[n].is_floating_point())
        if not_float:
            raise UserError(f"bad value for method.target: non-float entries cannot be generated: {not_float}")
        return [n for n in names if n in chosen]  # the model's own order

    def broadcast(self, client: int) -> Mapping[str, torch.Tensor]:
        assert self.hn is not None, "server_init first"
        with torch.no_grad():
            generated = self.hn(client)
        return {**self.global_state, **generated}

    def global_view(self) -> None:
        return None  # every client gets weights generated for it: no one global model

    def _delta(self, update: ClientUpdate) -> dict[str, torch.Tensor]:
        return {n: (update.sent[n] - update.params[n]).float() for n in self.targets}

    def _step(self, grads: Mapping[str, torch.Tensor]) -> None:
        """One step of the paper's optimizer on the whole hypernetwork, its gradient norm clipped."""
        assert self.hn is not None
        params = dict(self.hn.named_parameters())
        clip_and_step([params[n] for n in grads], list(grads.values()), self.options.max_grad_norm,
                      [self.hn_optimizer, self.embed_optimizer])

    def start_aggregation(self) -> None:
        """FedAvg's running mean for the ungenerated entries; with `step=round`, the round's gradient sum."""
        super().start_aggregation()
        assert self.hn is not None
        self._round = RoundGradient(self.hn) if self.options.step == "round" else None

    def add_update(self, update: ClientUpdate) -> None:
        """One server step on this client's update as it arrives (the paper), or its share of the round's.

        On the CPU the engine trains clients one after another, so each client was
        sent what the hypernetwork, as stepped so far, generates (as in the paper);
        clients trained together were all sent what it generated before their steps.
        """
        super().add_update(update)
        assert self.hn is not None, "server_init first"
        if self._round is not None:
            self._round.add(update.client, self._delta(update), update.num_samples)
        else:
            self._step(client_gradient(self.hn, update.client, self._delta(update)))

    def finish_aggregation(self) -> None:
        """FedAvg's mean for the ungenerated entries; with `step=round`, one step on the round's gradient."""
        super().finish_aggregation()
        acc, self._round = self._round, None
        if acc is not None and acc.total > 0:
            self._step(acc.result())

    # -- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """FedAvg's state plus the hypernetwork (base included) and its optimizers."""
        assert self.hn is not None, "server_init first"
        return {
            **super().state_dict(),
            "hn": {n: t.detach().clone() for n, t in self.hn.state_dict().items()},
            "hn_optimizer": self.hn_optimizer.state_dict(),
            "embed_optimizer": self.embed_optimizer.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        assert self.hn is not None, "server_init first"
        super().load_state_dict(state)
        self.hn.load_state_dict(state["hn"])  # strict: names and shapes must match
        self.hn_optimizer.load_state_dict(state["hn_optimizer"])
        self.embed_optimizer.load_state_dict(state["embed_optimizer"])

    # -- reporting and tuning ----------------------------------------------------------
    def run_info(self) -> dict[str, int | float | str]:
        if self.hn is None:
            return {}
        return {
            "hn_parameters": self.hn.num_generator_parameters(),
            "hn_base_parameters": self.hn.num_generated,
            "hn_client_embedding_parameters": self.hn.embeddings.weight.numel(),
            "hn_chunks": self.hn.num_chunks,  # 0: one output layer per generated tensor
            "hn_generated_parameters": self.hn.num_generated,
        }

    @classmethod
    def search_space(cls, trial: SearchTrial) -> dict[str, Any]:
        return {
            "method.hn_lr": trial.suggest_float("method.hn_lr", 1e-3, 1e-1, log=True),
            "method.embed_lr": trial.suggest_float("method.embed_lr", 1e-3, 1e-1, log=True),
            "method.hidden_dim": trial.suggest_categorical("method.hidden_dim", [64, 100, 200]),
        }
