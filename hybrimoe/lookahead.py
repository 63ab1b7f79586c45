"""Look-ahead prediction for prefetch (HybriMoE sec. 4.4): the routers of MoE layers i+1..i+h
applied to layer i's input predict which experts those layers will use.

One matmul over a stack of the look-ahead layers' routers and one top-k give the predicted ids on
the device (`ids`); they ride to the host in the layer's routing copy, and `predictions` turns
them into the prefetcher's Prediction per target layer.
"""

from __future__ import annotations

import numpy as np
import torch

from .prefetch import Prediction


class LookAhead:
    """routers: {MoE layer: (router weight (E, H), RoutingConfig)}, filled as layers register
    (shared with the runtime); moe_layers: the model's MoE layers in order; horizon: layers ahead."""

    def __init__(self, routers: dict, moe_layers, n_experts: int, top_k: int, hidden: int, horizon: int,
                 device: torch.device):
        self.routers, self.moe_layers = routers, tuple(moe_layers)
        self.n_experts, self.top_k, self.hidden, self.horizon, self.device = n_experts, top_k, hidden, horizon, device
        self._cache: dict[int, tuple] = {}
        self._stack = None  # every MoE layer's router (n_layers*E, H) float

    def routers_changed(self) -> None:
        self._cache.clear()
        self._stack = None

    def layers(self, i: int):
        """(MoE layer indices i+1..i+h whose routers are known, their router weights (n*E, H) on the
        device): one matmul predicts every look-ahead layer. The weights are a slice of one stack
        of all the model's routers, built on first use (one extra copy of the routers in all)."""
        la = self._cache.get(i)
        if la is None:
            js = []
            for j in range(i + 1, min(i + 1 + self.horizon, len(self.moe_layers))):
                if self.moe_layers[j] not in self.routers:
                    break
                js.append(j)
            w = None
            if js:
                if self._stack is None:  # layers without a router yet: zeros, never sliced
                    self._stack = torch.cat([
                        self.routers[layer][0].detach().float().to(self.device) if layer in self.routers else
                        torch.zeros(self.n_experts, self.hidden, device=self.device) for layer in self.moe_layers])
                E = self.n_experts
                w = self._stack[js[0] * E:(js[-1] + 1) * E]
            la = self._cache[i] = (js, w)
        return la

    def ids(self, i: int, x: torch.Tensor) -> torch.Tensor | None:
        """(T, n*k) expert ids on x's device that the routers of the n look-ahead layers of MoE
        layer i pick for x (one matmul, one top-k; no host sync), or None when there are none.
        Each look-ahead layer's router applied to this layer's input is the paper's prediction;
        softmax and sigmoid are monotonic per row, so the top-k of the logits are the routed ids."""
        js, w_stack = self.layers(i)
        if not js:
            return None
        logits = (x.float() @ w_stack.T).view(x.shape[0], len(js), self.n_experts)
        return torch.topk(logits, self.top_k, dim=-1).indices.reshape(x.shape[0], -1)

    def predictions(self, i: int, la_np: np.ndarray, accuracy: dict[int, float]) -> dict[int, Prediction]:
        """Predictions of the look-ahead layers from their top-k ids (T, n*k) on the host.
        accuracy: {distance: measured recall}, each candidate's confidence (0.5 until measured)."""
        js, _ = self.layers(i)
        pred_ids = la_np.reshape(la_np.shape[0], len(js), self.top_k)
        preds = {}
        if la_np.shape[0] == 1:  # one token: each layer's top-k ids are distinct, one token each
            ones = np.ones(self.top_k, np.int64)
            for d, j in enumerate(js):
                e = np.sort(pred_ids[0, d]).astype(np.int64, copy=False)
                preds[j] = Prediction(e, ones, np.full(self.top_k, accuracy.get(d + 1, 0.5)))
            return preds
        for d, j in enumerate(js):
            c = np.bincount(pred_ids[:, d].ravel(), minlength=self.n_experts)
            e = np.flatnonzero(c)
            preds[j] = Prediction(e, c[e], np.full(len(e), accuracy.get(d + 1, 0.5)))
        return preds
