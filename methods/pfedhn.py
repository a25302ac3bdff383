"""pFedHN (Shamsian et al., ICML 2021) for Vision Transformers, with a chunked hypernetwork.

The server keeps a learned embedding per client and a hypernetwork that turns
an embedding into the client's copy of the *target* tensors: every block's
attention qkv and proj weights by default, plus the classifier head (the paper
generates every layer, the classifier included). Generating each tensor with
its own linear output layer, as the paper does for small CNNs, would need
`hidden_dim x numel` weights per tensor (billions for ViT-S), so the
generator here emits fixed-size chunks instead:

    h         = MLP(e_client)                     the paper's MLP body
    chunk_j   = W (h * c_j)                       one linear generator for all chunks
    targets   = base + concat(chunk_1 .. chunk_J)[:N], cut and reshaped into the target tensors

`c_j` is a learned embedding of chunk j (width `hidden_dim`) that gates the
client features, so each chunk reads its own linear view of the client.
Stacked over chunks the chunked output is `C diag(h) W^T`: its rank is at
most `hidden_dim` per generated matrix, far below a ViT-S attention
matrix's. So a full-size learned `base`, shared by every client, carries the
common solution (it starts at the model's own initial weights), and the
hypernetwork only the client's deviation from it, which starts small
(`init_deviation`). The hypernetwork grows with the target by one chunk
embedding per chunk; the base is one value per generated value, like the
model it stands for.

Variant `pc` (pFedHN-PC) keeps the classifier head on the client instead.
Untargeted shared entries are averaged exactly as in FedAvg. After local
training on the generated weights each client returns them; the server pushes
`delta = sent - after` back through the generator (a vector-Jacobian product;
for the base it is the delta itself, so `base_lr = 1` is FedAvg's step there),
clips the hypernetwork's gradient norm and steps SGD on the base, the
hypernetwork and the client embeddings. The hypernetwork's learning rates are
divided by the largest eigenvalue of `J J^T` (J: the Jacobian of a client's
deviation with respect to the hypernetwork and its embedding, at the start,
by power iteration), so with `hn_lr = 1` its step moves a client's generated
weights by at most the client's delta along any direction, at every chunk
count: without it a ViT-S-sized step overshoots the delta many times over.
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
from .structure import head_entries

DEFAULT_TARGET = ("blocks.*.attn.qkv.weight", "blocks.*.attn.proj.weight")
VARIANTS = ("hn", "pc")


@dataclass
class PFedHNOptions(MethodConfig):
    """Options of pFedHN (`method.*`)."""

    target: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET))  # glob patterns of generated entries
    variant: str = "hn"  # hn: the classifier head is generated too (the paper); pc: the head stays on the client
    embed_dim: int = 0  # client embedding size; 0 = 1 + num_clients // 4 (the paper's rule)
    hidden_dim: int = 100  # width of the MLP body and of the chunk embeddings
    n_hidden: int = 3  # hidden->hidden layers of the MLP body after its input layer
    chunk_size: int = 2048  # values the generator emits per chunk
    hn_lr: float = 0.1  # SGD learning rate of the hypernetwork, in units of its largest step (see the module doc)
    base_lr: float = 1.0  # SGD learning rate of the shared base (1: FedAvg's step; no momentum, no decay)
    init_deviation: float = 0.1  # RMS of the clients' initial deviation from the base, relative to the targets' RMS
    embed_lr: float = 0.0  # SGD learning rate of the client embeddings; 0 = hn_lr
    momentum: float = 0.9  # SGD momentum of both server optimizers
    weight_decay: float = 1e-3  # SGD weight decay of both server optimizers
    max_grad_norm: float = 50.0  # clip the server gradient's total norm; 0 = off
    novel_rounds: int = 10  # embedding-fit steps for held-out clients (data.novel_clients) after the last round

    def validate(self) -> None:
        """Range checks; a UserError names the key."""

        def require(ok: bool, key: str, value: Any, allowed: str) -> None:
            if not ok:
                raise UserError(f"bad value for method.{key}: {value!r} ({allowed})")

        require(bool(self.target) and all(p.strip() for p in self.target), "target", self.target,
                "one or more glob patterns over parameter names, e.g. blocks.*.attn.qkv.weight")
        require(self.variant in VARIANTS, "variant", self.variant, f"choose one of: {', '.join(VARIANTS)}")
        require(self.embed_dim >= 0, "embed_dim", self.embed_dim, "must be >= 1, or 0 for 1 + num_clients // 4")
        for key in ("hidden_dim", "chunk_size", "novel_rounds"):
            require(getattr(self, key) >= 1, key, getattr(self, key), "must be >= 1")
        require(self.n_hidden >= 0, "n_hidden", self.n_hidden, "must be >= 0")
        require(self.hn_lr > 0, "hn_lr", self.hn_lr, "must be > 0")
        require(self.base_lr > 0, "base_lr", self.base_lr, "must be > 0")
        require(self.init_deviation > 0, "init_deviation", self.init_deviation, "must be > 0")
        require(self.embed_lr >= 0, "embed_lr", self.embed_lr, "must be > 0, or 0 for hn_lr")
        require(0 <= self.momentum < 1, "momentum", self.momentum, "must be in [0, 1)")
        require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        require(self.max_grad_norm >= 0, "max_grad_norm", self.max_grad_norm, "must be >= 0 (0 = off)")


class ChunkedHypernetwork(nn.Module):
    """A shared full-size base + (client embedding -> MLP -> one linear generator gated by chunk embeddings)."""

    def __init__(
        self,
        num_clients: int,
        shapes: Mapping[str, Sequence[int]],
        *,
        embed_dim: int,
        hidden_dim: int,
        n_hidden: int,
        chunk_size: int,
    ):
        super().__init__()
        self.shapes = {name: torch.Size(shape) for name, shape in shapes.items()}
        self.sizes = [s.numel() for s in self.shapes.values()]
        self.num_generated = sum(self.sizes)
        self.num_chunks = math.ceil(self.num_generated / chunk_size)
        self.embeddings = nn.Embedding(num_clients, embed_dim)  # N(0, 1), as in the paper
        layers: list[nn.Module] = [nn.Linear(embed_dim, hidden_dim)]
        for _ in range(n_hidden):
            layers += [nn.ReLU(), nn.Linear(hidden_dim, hidden_dim)]
        self.body = nn.Sequential(*layers)
        self.chunk_embeddings = nn.Parameter(torch.randn(self.num_chunks, hidden_dim))
        # No bias: it would add one pattern to every chunk, which the base already covers, and its
        # step would move all chunks at once (a Jacobian eigenvalue of num_chunks).
        self.generator = nn.Linear(hidden_dim, chunk_size, bias=False)
        self.base = nn.Parameter(torch.zeros(self.num_generated))  # the shared part, all targets flattened

    def deviation(self, embedding: torch.Tensor) -> torch.Tensor:
        """The client's flat deviation from the base, from its embedding (shape `(embed_dim,)`)."""
        h = self.body(embedding)
        chunks = self.generator(self.chunk_embeddings * h)  # (num_chunks, chunk_size)
        return chunks.reshape(-1)[: self.num_generated]

    def generate(self, embedding: torch.Tensor) -> dict[str, torch.Tensor]:
        """The target tensors generated from one client embedding: base + deviation."""
        flat = self.base + self.deviation(embedding)
        return {name: piece.view(shape) for (name, shape), piece in zip(self.shapes.items(), flat.split(self.sizes))}

    def forward(self, client: int) -> dict[str, torch.Tensor]:
        return self.generate(self.embeddings.weight[client])

    def hypernetwork_parameters(self) -> list[nn.Parameter]:
        """The generator of the deviation, shared by all clients: neither the base nor the embeddings."""
        return [p for name, p in self.named_parameters() if name != "base" and not name.startswith("embeddings.")]

    @torch.no_grad()
    def set_base(self, targets: Mapping[str, torch.Tensor]) -> None:
        """Start the base at the given target tensors (the model's initial weights)."""
        self.base.copy_(torch.cat([targets[name].reshape(-1).to(self.base.dtype) for name in self.shapes]))

    def num_hypernetwork_parameters(self) -> int:
        return sum(p.numel() for p in self.hypernetwork_parameters())

    @torch.no_grad()
    def init_scale(self, rms: float) -> None:
        """Set the scale of the generator's input and output at the start.

        Input: the chunk embeddings are scaled so `||h * c_j||^2` is 1 on average
        over clients and chunks, whatever the widths.
        Output: the generator is scaled so the deviations' RMS over all clients
        is `rms`.
        """
        h = self.body(self.embeddings.weight)  # (num_clients, hidden_dim)
        features = float((h.square().mean(0) * self.chunk_embeddings.square().mean(0)).sum())
        if features > 0:
            self.chunk_embeddings.mul_(1 / math.sqrt(features))
        if rms <= 0:
            return
        square_sum = sum(float(self.deviation(row).square().sum()) for row in self.embeddings.weight)
        current = math.sqrt(square_sum / (self.num_generated * self.embeddings.num_embeddings))
        if current > 0:
            self.generator.weight.mul_(rms / current)


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


def top_step_eigenvalue(
    hn: ChunkedHypernetwork, inputs: Sequence[torch.Tensor], client: int = 0, iterations: int = 20
) -> float:
    """The largest eigenvalue of `J J^T`, J the Jacobian of client `client`'s deviation
    with respect to `inputs` (parameters of `hn`), by power iteration.

    An SGD step of size `lr` along `J^T delta` moves the deviation by
    `lr J J^T delta`; dividing `lr` by this eigenvalue bounds that move by
    `||delta||` along every direction.
    """
    inputs = list(inputs)
    with torch.enable_grad():
        out = hn.deviation(hn.embeddings.weight[client])
        probe = torch.zeros_like(out, requires_grad=True)
        # J^T probe, kept differentiable in `probe`: its gradient gives J v (a Jacobian-vector product).
        transposed = torch.autograd.grad(out, inputs, grad_outputs=probe, create_graph=True)
        u = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype).to(out.device)
        u = u / u.norm()
        value = 0.0
        for _ in range(iterations):
            v = torch.autograd.grad(out, inputs, grad_outputs=u, retain_graph=True)  # J^T u
            (w,) = torch.autograd.grad(transposed, probe, grad_outputs=list(v), retain_graph=True)  # J J^T u
            value = float(w.norm())
            if value == 0:
                return 0.0
            u = w / value
    return value


class RoundGradient:
    """The server's gradient for one round, summed client by client as updates arrive.

    Shared parameters (the base and the hypernetwork): the weighted mean over
    the round's clients of `J_i^T delta_i` (for the base, `delta_i` itself),
    i.e. one step on the round's clients as a minibatch (each weighted by its
    samples, as FedAvg weights the rest of the model). Client embeddings: each
    client's row gets its own, undivided `J_i^T delta_i`, the step the paper
    takes for the client it visits. Every vector-Jacobian product is taken at
    the parameters that generated the tensors the clients were sent (nothing
    steps until `result`).
    """

    def __init__(self, hn: ChunkedHypernetwork):
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
    hn: ChunkedHypernetwork,
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
    """pFedHN (Shamsian et al., 2021): a server hypernetwork generates each client's attention weights and head."""

    Options = PFedHNOptions
    options: PFedHNOptions

    def __init__(self, options: PFedHNOptions | None = None):
        super().__init__(options)
        self.hn: ChunkedHypernetwork | None = None
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
        rms = math.sqrt(sum(float(t.square().sum()) for t in initial.values()) / size)
        self.hn = ChunkedHypernetwork(
            num_clients, {n: shared[n].shape for n in self.targets},
            embed_dim=opts.embed_dim or 1 + num_clients // 4, hidden_dim=opts.hidden_dim,
            n_hidden=opts.n_hidden, chunk_size=opts.chunk_size,
        ).to(next(iter(initial.values())).device)
        self.hn.init_scale(opts.init_deviation * rms)
        self.hn.set_base(initial)
        hn = self.hn
        self.step_eigenvalue = top_step_eigenvalue(hn, [*hn.hypernetwork_parameters(), hn.embeddings.weight])
        scale = 1 / self.step_eigenvalue if self.step_eigenvalue > 0 else 1.0
        common = {"momentum": opts.momentum, "weight_decay": opts.weight_decay}
        self.base_optimizer = torch.optim.SGD([hn.base], lr=opts.base_lr)
        self.hn_optimizer = torch.optim.SGD(hn.hypernetwork_parameters(), lr=opts.hn_lr * scale, **common)
        self.embed_optimizer = torch.optim.SGD(
            [hn.embeddings.weight], lr=(opts.embed_lr or opts.hn_lr) * scale, **common
        )

    def _select_targets(self, model: nn.Module, shared: Mapping[str, torch.Tensor]) -> list[str]:
        names = list(model.state_dict(keep_vars=True))
        # Variant hn generates the classifier too, as the paper generates every layer.
        chosen: set[str] = head_entries(model) if self.options.variant == "hn" else set()
        for pattern in self.options.target:
            matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
            if not matched:
                examples = ", ".join(n for n in names if n.endswith(".weight"))[:200]
                raise UserError(f"bad value for method.target: {pattern!r} matches no model entry (e.g. {examples})")
            chosen.update(matched)
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

    def start_aggregation(self) -> None:
        """FedAvg's running mean for the untargeted entries; the hypernetwork's gradient summed as clients arrive."""
        super().start_aggregation()
        assert self.hn is not None
        self._round = RoundGradient(self.hn)

    def add_update(self, update: ClientUpdate) -> None:
        super().add_update(update)
        assert self._round is not None, "start_aggregation first"
        self._round.add(update.client, self._delta(update), update.num_samples)

    def finish_aggregation(self) -> None:
        """One step of the base, the hypernetwork and the embeddings on the round's gradient."""
        super().finish_aggregation()
        acc, self._round = self._round, None
        if acc is None or acc.total <= 0:
            return
        assert self.hn is not None
        grads = acc.result()
        params = dict(self.hn.named_parameters())
        # The base's step is the clients' mean delta, unclipped (FedAvg's step at base_lr = 1).
        clip_and_step([params["base"]], [grads.pop("base")], 0, [self.base_optimizer])
        clip_and_step([params[n] for n in grads], list(grads.values()), self.options.max_grad_norm,
                      [self.hn_optimizer, self.embed_optimizer])

    # -- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """FedAvg's state plus the hypernetwork (base included) and its optimizers."""
        assert self.hn is not None, "server_init first"
        return {
            **super().state_dict(),
            "hn": {n: t.detach().clone() for n, t in self.hn.state_dict().items()},
            "base_optimizer": self.base_optimizer.state_dict(),
            "hn_optimizer": self.hn_optimizer.state_dict(),
            "embed_optimizer": self.embed_optimizer.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        assert self.hn is not None, "server_init first"
        super().load_state_dict(state)
        self.hn.load_state_dict(state["hn"])  # strict: names and shapes must match
        self.base_optimizer.load_state_dict(state["base_optimizer"])
        self.hn_optimizer.load_state_dict(state["hn_optimizer"])
        self.embed_optimizer.load_state_dict(state["embed_optimizer"])

    # -- reporting and tuning ----------------------------------------------------------
    def run_info(self) -> dict[str, int | float | str]:
        if self.hn is None:
            return {}
        return {
            "hn_parameters": self.hn.num_hypernetwork_parameters(),
            "hn_base_parameters": self.hn.base.numel(),
            "hn_step_eigenvalue": self.step_eigenvalue,
            "hn_client_embedding_parameters": self.hn.embeddings.weight.numel(),
            "hn_chunks": self.hn.num_chunks,
            "hn_generated_parameters": self.hn.num_generated,
        }

    @classmethod
    def search_space(cls, trial: SearchTrial) -> dict[str, Any]:
        return {
            "method.hn_lr": trial.suggest_float("method.hn_lr", 1e-2, 1.0, log=True),
            "method.embed_dim": trial.suggest_categorical("method.embed_dim", [8, 16, 32]),
            "method.hidden_dim": trial.suggest_categorical("method.hidden_dim", [64, 100, 200]),
            "method.chunk_size": trial.suggest_categorical("method.chunk_size", [512, 1024, 2048, 4096]),
        }
