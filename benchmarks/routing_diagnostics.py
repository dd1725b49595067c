"""Why a merged model does (not) match its owners: where each domain's validation tokens are routed, and how
separable the domains are per token in the router's input at all.

    python benchmarks/routing_diagnostics.py --merged DIR [--anchor DIR] [--data outputs/tokenizer]

--merged: per layer and domain, the owner model's p(own expert) (the merged router restricted to [public, own],
which is exactly the owner's 2-expert router), the merged model's p(own), how often own is top-1 / in the top-k,
and the expert that takes the most probability. --anchor: token-level domain accuracy of two linear routers on
the anchor's hidden states (the router input): nearest centred mean (what domain-mean rows can do) and a
logistic regression fit on all domains' training tokens (what jointly trained rows could reach)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
from benchmarks.machine import machine  # noqa: E402


def token_batch(data: Path, domain: str, split: str, batches: int) -> torch.Tensor:
    from flexolmo_core.training.data import fixed_batches, open_windows

    return torch.cat(fixed_batches(open_windows(data / domain / split, 256), 8, batches))


def routing(merged: Path, data: Path, batches: int) -> list[dict]:
    from flexolmo_core.io.layout import from_hf_moe
    from flexolmo_core.training.model import MoEShape, build
    from flexolmo_core.training.stages import read_merged

    cfg, state, manifest = read_merged(merged)
    names, k = [e["domain"] for e in manifest["experts"]], manifest["top_k"]
    model = build(cfg, MoEShape(len(names), k), from_hf_moe(state, cfg.n_layers), lambda n: False, torch.float32).eval()
    rows = []
    for own, domain in enumerate(names):
        with torch.no_grad():  # hidden_states returns each layer's router input
            hidden = model.hidden_states(token_batch(data, domain, "validation", batches)[:, :-1])
            logits = [layer.router_logits(h.reshape(-1, h.shape[-1])) for layer, h in zip(model.layers, hidden)]
        for i, lg in enumerate(logits):
            p = torch.softmax(lg, -1)
            top = p.topk(k, -1).indices
            rows.append({"domain": domain, "layer": i,
                         "owner_p_own": torch.softmax(lg[:, [0, own]], -1)[:, 1].mean().item() if own else None,
                         "merged_p_own": p[:, own].mean().item(), "top1_rate": (top[:, 0] == own).float().mean().item(),
                         "in_top_k_rate": (top == own).any(-1).float().mean().item(),
                         "most_probability": names[int(p.mean(0).argmax())]})
    return rows


def separability(anchor_dir: Path, data: Path, domains: list[str], batches: int) -> list[dict]:
    from flexolmo_core.anchor.model import load_anchor, model_config_from_hf
    from flexolmo_core.io.layout import from_hf_dense
    from flexolmo_core.training.model import MoEShape, build

    anchor = load_anchor(anchor_dir)
    cfg = model_config_from_hf(anchor.config)
    model = build(cfg, MoEShape(), from_hf_dense(anchor.state_dict(), cfg.n_layers, tied=cfg.tie_embeddings), lambda n: False, torch.float32).eval()

    def hidden(split, n):
        with torch.no_grad():
            return {d: [h.reshape(-1, h.shape[-1]) for h in model.hidden_states(token_batch(data, d, split, n)[:, :-1])]
                    for d in domains}

    train, val = hidden("train", 2 * batches), hidden("validation", batches)
    out = []
    for layer in range(cfg.n_layers):
        x = torch.cat([train[d][layer] for d in domains])
        y = torch.cat([torch.full((len(train[d][layer]),), i) for i, d in enumerate(domains)])
        xv = torch.cat([val[d][layer] for d in domains])
        yv = torch.cat([torch.full((len(val[d][layer]),), i) for i, d in enumerate(domains)])
        means = torch.stack([train[d][layer].mean(0) for d in domains])
        centre = means.mean(0)
        rows = torch.nn.functional.normalize(means - centre, dim=-1)
        centroid = ((xv - centre) @ rows.T).argmax(-1).eq(yv).float().mean().item()
        mu, sd = x.mean(0), x.std(0) + 1e-6
        torch.manual_seed(0)
        w = torch.zeros(x.shape[1], len(domains), requires_grad=True)
        b = torch.zeros(len(domains), requires_grad=True)
        opt = torch.optim.Adam([w, b], lr=1e-2)
        for _ in range(300):
            opt.zero_grad()
            torch.nn.functional.cross_entropy((x - mu) / sd @ w + b, y).backward()
            opt.step()
        logistic = (((xv - mu) / sd @ w + b).argmax(-1) == yv).float().mean().item()
        out.append({"layer": layer, "centroid_accuracy": centroid, "logistic_accuracy": logistic,
                    "chance": 1 / len(domains), "hidden_norm": x.norm(dim=-1).mean().item()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--merged", type=Path, required=True, help="a merged (or router-tuned) model folder")
    ap.add_argument("--anchor", type=Path, default=None, help="also measure per-token separability on this anchor")
    ap.add_argument("--data", type=Path, default=ROOT / "outputs/tokenizer", help="the tokenizer stage's splits")
    ap.add_argument("--batches", type=int, default=1, help="validation batches of 8 x 256 tokens per domain")
    args = ap.parse_args()
    torch.set_num_threads(2)
    report = {"machine": machine(), "routing": routing(args.merged, args.data, args.batches)}
    print("| domain | layer | owner p(own) | merged p(own) | own top-1 | own in top-k | most probability |")
    print("|---|---|---|---|---|---|---|")
    for r in report["routing"]:
        owner = "-" if r["owner_p_own"] is None else f"{r['owner_p_own']:.2f}"
        print(f"| {r['domain']} | {r['layer']} | {owner} | {r['merged_p_own']:.2f} | {r['top1_rate']:.2f} | "
              f"{r['in_top_k_rate']:.2f} | {r['most_probability']} |")
    print("\n| domain | owner p(own), mean over layers | merged p(own), mean over layers | own top-1 | own in top-k |")
    print("|---|---|---|---|---|")
    for domain in dict.fromkeys(r["domain"] for r in report["routing"]):
        rows = [r for r in report["routing"] if r["domain"] == domain]
        mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
        owner = "-" if rows[0]["owner_p_own"] is None else f"{mean('owner_p_own'):.3f}"
        print(f"| {domain} | {owner} | {mean('merged_p_own'):.3f} | {mean('top1_rate'):.3f} | {mean('in_top_k_rate'):.3f} |")
    if args.anchor:
        domains = sorted({r["domain"] for r in report["routing"]}, key=[r["domain"] for r in report["routing"]].index)
        report["separability"] = separability(args.anchor, args.data, domains, args.batches)
        print("\n| layer | centroid rows top-1 | logistic (joint) top-1 | chance | mean |h| |\n|---|---|---|---|---|")
        for r in report["separability"]:
            print(f"| {r['layer']} | {r['centroid_accuracy']:.2f} | {r['logistic_accuracy']:.2f} | {r['chance']:.3f} | "
                  f"{r['hidden_norm']:.1f} |")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
