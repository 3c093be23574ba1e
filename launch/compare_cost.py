"""Prints a Table-1 style cost comparison: parameters, training FLOPs, inference FLOPs per token.

  python -m launch.compare_cost --paper
  python -m launch.compare_cost --models=calm_l_k1,calm_l_k2,calm_l_k4,calm_l_k8,transformer_l
  python -m launch.compare_cost --models=calm_m,transformer_s --tokens=1e11 --breakdown
  python -m launch.compare_cost --heads        # energy vs diffusion vs flow, per token

Model names are those of ``calm_jax.cost.flops.paper_configs()``.  The counting
convention is in docs/FLOPS.md; ``--paper`` adds the paper's numbers and our
residual against each.
"""

from __future__ import annotations

from absl import flags

from calm_jax.cost import flops
from launch import cli


def _define(fv: flags.FlagValues) -> None:
  d = {"flag_values": fv}
  flags.DEFINE_list("models", list(flops.PAPER_TABLE1), "Model names from flops.paper_configs().", **d)
  flags.DEFINE_float("tokens", flops.PAPER_TOKENS, "Training token budget.", **d)
  flags.DEFINE_integer("context", flops.PAPER_CONTEXT,
                       "Attention context in positions: tokens (baseline), chunks (CALM).", **d)
  flags.DEFINE_float("ae_tokens", flops.PAPER_AE_TOKENS, "Autoencoder training tokens (CALM rows).", **d)
  flags.DEFINE_enum("head_convention", "factored", flops.HEAD_CONVENTIONS,
                    "How the head's N training samples count (docs/FLOPS.md).", **d)
  flags.DEFINE_bool("paper", False, "Print the paper's Table 1 with our residuals (ignores --models, "
                    "--tokens, --context, --ae_tokens).", **d)
  flags.DEFINE_bool("breakdown", False, "Also print the per-token FLOPs by part.", **d)
  flags.DEFINE_bool("heads", False,
                    "Print each generative head's training and inference FLOPs per token "
                    "on the head-ablation base and CALM-M (flops.head_configs(); uses --context).", **d)


def format_rows(rows: list[flops.CostRow]) -> str:
  """The comparison table: counts in M, training FLOPs in 1e20, inference in 1e8 per token."""
  out = [f"{'model':<16}{'params(M)':>11}{'non-emb(M)':>12}{'train(1e20)':>13}{'infer/tok(1e8)':>16}"]
  for r in rows:
    out.append(f"{r.name:<16}{r.params.total / 1e6:>11.2f}{r.params.non_embedding / 1e6:>12.2f}"
               f"{r.train_flops / 1e20:>13.2f}{r.infer_flops_per_token / 1e8:>16.2f}")
  return "\n".join(out)


def format_savings(rows: list[flops.CostRow]) -> str:
  """Training / inference FLOPs each CALM row saves against each baseline row."""
  calm = [r for r in rows if r.kind == "energy"]
  base = [r for r in rows if r.kind == "transformer"]
  if not calm or not base:
    return ""
  out = ["savings (train / infer) of CALM vs baseline:",
         f"{'':<16}" + "".join(f"{b.name:>22}" for b in base)]
  for c in calm:
    cells = ("{:+.1%} / {:+.1%}".format(*flops.savings(c, b)) for b in base)
    out.append(f"{c.name:<16}" + "".join(f"{x:>22}" for x in cells))
  return "\n".join(out)


def format_breakdown(rows: list[flops.CostRow]) -> str:
  """Per-token FLOPs by part (in 1e6) for training and inference."""
  parts = list(flops.FlopsBreakdown().as_dict())
  out = [f"{'per token (1e6)':<22}" + "".join(f"{p:>12}" for p in parts) + f"{'total':>12}"]
  for r in rows:
    for tag, b in (("train", r.train_breakdown), ("infer", r.infer_breakdown)):
      d = b.as_dict()
      out.append(f"{r.name + ' ' + tag:<22}" + "".join(f"{d[p] / 1e6:>12.1f}" for p in parts)
                 + f"{b.total / 1e6:>12.1f}")
  return "\n".join(out)


def format_paper(head_convention: str) -> str:
  """Table 1 of the paper next to ours, with the relative residual of every cell."""
  rows, cells = flops.paper_table1(head_convention)
  units = {"params": (1e6, "M"), "train_flops": (1e20, "e20"), "infer_flops": (1e8, "e8")}
  out = [f"Table 1 (D={flops.PAPER_TOKENS:.1e} tokens, context {flops.PAPER_CONTEXT}, "
         f"AE {flops.PAPER_AE_TOKENS:.1e} tokens, head convention {head_convention})",
         f"{'model':<16}{'column':<13}{'ours':>12}{'paper':>12}{'residual':>10}"]
  for c in cells:
    scale, unit = units[c.column]
    ok = (flops.params_match_paper(c.ours, c.paper) if c.column == "params" else abs(c.residual) <= 0.03)
    ours, paper = f"{c.ours / scale:.2f}{unit}", f"{c.paper / scale:.2f}{unit}"
    out.append(f"{c.model:<16}{c.column:<13}{ours:>12}{paper:>12}{c.residual:>+10.1%}{'' if ok else '  *'}")
  n_ok = sum(abs(c.residual) <= 0.03 for c in cells if c.column != "params")
  out.append(f"FLOPs cells within 3%: {n_ok} of 12 (* marks a miss; parameter counts are compared with the "
             "paper's truncated figures)")
  by = {r.name: r for r in rows}
  out.append("paper's savings CALM-M vs Transformer-S: train {:.1%}, infer {:.1%}; ours: {:.1%}, {:.1%}".format(
      1 - flops.PAPER_TABLE1["calm_m"][1] / flops.PAPER_TABLE1["transformer_s"][1],
      1 - flops.PAPER_TABLE1["calm_m"][2] / flops.PAPER_TABLE1["transformer_s"][2],
      *flops.savings(by["calm_m"], by["transformer_s"])))
  return "\n".join(out + ["", format_savings(rows)])


def format_heads(context: int, head_convention: str) -> str:
  """Per-token FLOPs of each generative head (the head's part and the whole model), training and inference."""
  from calm_jax.models import heads  # pylint: disable=import-outside-toplevel
  out = [f"generative heads (context {context} steps, head convention {head_convention}; FLOPs per token)",
         f"{'model':<20}{'head(M)':>9}{'calls':>7}{'train head':>12}{'train all':>12}{'infer head':>12}"
         f"{'infer all':>12}{'head/all':>10}"]
  for name, (kind, cfg, ae_cfg) in flops.head_configs().items():
    tr = flops.flops_per_token(kind, cfg, context, train=True, ae_cfg=ae_cfg, head_convention=head_convention)
    inf = flops.flops_per_token(kind, cfg, context, train=False, ae_cfg=ae_cfg,
                                head_convention=head_convention)
    h = heads.get(cfg)
    out.append(f"{name:<20}{sum(h.param_counts().values()) / 1e6:>9.2f}{h.network_calls:>7}"
               f"{tr.head:>12.3e}{tr.total:>12.3e}{inf.head:>12.3e}{inf.total:>12.3e}"
               f"{inf.head / inf.total:>10.1%}")
  out.append("calls: network calls per sample at inference (diffusion: respaced DDPM steps; flow: 10 "
             "midpoint steps = 20 calls, the reference code's default). Training: one call per replicate, "
             "N = num_samples.")
  return "\n".join(out)


def main(argv=None):
  fv = cli.parse(_define, argv, __doc__, "launch.compare_cost")
  if fv.heads:
    print(format_heads(fv.context, fv.head_convention))
    return
  if fv.paper:
    print(format_paper(fv.head_convention))
    return
  specs = flops.paper_configs()
  unknown = [m for m in fv.models if m not in specs]
  if unknown:
    cli.fail(f"--models: unknown models {unknown}; known: {', '.join(specs)}")
  rows = flops.compare({m: specs[m] for m in fv.models}, fv.tokens, fv.context,
                       ae_tokens=fv.ae_tokens, head_convention=fv.head_convention)
  print(f"D={fv.tokens:.2e} tokens, context {fv.context}, AE {fv.ae_tokens:.1e} tokens, "
        f"head convention {fv.head_convention}")
  print(format_rows(rows))
  s = format_savings(rows)
  if s:
    print("\n" + s)
  if fv.breakdown:
    print("\n" + format_breakdown(rows))


if __name__ == "__main__":
  main()
