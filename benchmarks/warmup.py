"""Does the sweep's warm-up bring the machine to steady state? First vs later rounds.

Each warm-up scheme runs in a FRESH process (a cold start is the thing measured), then
measures every configuration in R interleaved rounds (A B C D, A B C D, ...) on the same
prompt. Steady state means round 1 looks like rounds 2..R: the table gives, per
configuration, round 1's TPOT / the median of the later rounds, the same for TTFT, and
for the process CPU time of the whole generation. CPU time counts the work done, not the
waiting for a core: on a shared machine it shows a cold start that wall-clock times bury
in noise (use --threads 1 there, so idle OpenMP threads spinning do not count as work).

  none  no warm-up at all
  old   the warm-up before issue 10: 4 tokens of the full cache + the first compressing config
  new   the runner's warm-up (plan.warm_up_plan): the full cache for all the tokens, then every
        other configuration for WARMUP_TOKENS tokens

    python benchmarks/warmup.py --threads 2            # ~3-5 minutes on a 2-core CPU
    python benchmarks/warmup.py --device cuda           # on a GPU
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import _common as c

SCHEMES = ("none", "old", "new")


def configs():
    from knormctl.config import PressConfig

    return {"full cache": PressConfig().validate(),
            "knorm 0.9 decode": PressConfig(press="knorm", keep_ratio=0.9, prune_after=256).validate(),
            "knorm 0.5 prefill": PressConfig(press="knorm", keep_ratio=0.5, prune_after=0, skip_layers=(),
                                             mode="prefill").validate(),
            "streaming 0.7 decode": PressConfig(press="streaming", keep_ratio=0.7, prune_after=256).validate()}


def child(args) -> None:
    """One scheme in this (fresh) process; prints one JSON line of per-round TPOT/TTFT."""
    from knormctl.engine.loop import run_generation
    from knormctl.plan import warm_up_plan

    c.setup(args)
    lm = c.load(args)
    ids = c.prompts(args, lm.tokenizer, 1, args.prompt_tokens)[0].prompt_ids
    cfgs = configs()
    if args.scheme == "old":
        for cfg in (cfgs["full cache"], cfgs["knorm 0.9 decode"]):
            run_generation(lm.model, ids, cfg, 4)
    elif args.scheme == "new":
        for cfg, n in warm_up_plan(list(cfgs.values()), args.new_tokens):
            run_generation(lm.model, ids, cfg, n)
    out = {name: {"tpot": [], "ttft": [], "cpu": [], "first_steps": None} for name in cfgs}
    for r in range(args.repeats):
        for name, cfg in cfgs.items():
            cpu0 = time.process_time()
            res = run_generation(lm.model, ids, cfg, args.new_tokens)
            out[name]["cpu"].append(time.process_time() - cpu0)
            out[name]["tpot"].append(c.median(res.step_latencies_s))
            out[name]["ttft"].append(res.ttft_s)
            if r == 0:
                out[name]["first_steps"] = res.step_latencies_s
    print(json.dumps(out))


def main() -> None:
    p = c.parser(__doc__.splitlines()[0], repeats=4)
    p.add_argument("--prompt-tokens", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--scheme", choices=SCHEMES, help=argparse_hidden())
    args = p.parse_args()
    if args.quick:
        args.prompt_tokens, args.new_tokens, args.repeats = 128, 8, 2
    if args.scheme:
        child(args)
        return
    c.setup(args)
    c.header("warm-up: first round vs later rounds, per warm-up scheme (each in a fresh process)", args,
             {"model": args.model, "prompt": f"{args.prompt_tokens} tokens", "new tokens": args.new_tokens,
              "rounds": args.repeats})
    results = {}
    for scheme in SCHEMES:
        c.log(f"scheme {scheme}: fresh process")
        cmd = [sys.executable, __file__, "--scheme", scheme, *sys.argv[1:]]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[scheme] = json.loads(done.stdout.strip().splitlines()[-1])
    rows = []
    for scheme, res in results.items():
        for name, v in res.items():
            later = {k: c.median(v[k][1:]) for k in ("tpot", "ttft", "cpu")}
            rows.append([scheme, name, c.ms(v["tpot"][0]), c.num(c.ratio(v["tpot"][0], later["tpot"])),
                         c.ms(v["ttft"][0], 0), c.num(c.ratio(v["ttft"][0], later["ttft"])),
                         c.ms(v["cpu"][0], 0), c.ms(later["cpu"], 0), c.num(c.ratio(v["cpu"][0], later["cpu"])),
                         " ".join(f"{x / later['cpu']:.2f}" for x in v["cpu"][1:])])
    c.table("round 1 vs rounds 2..R (medians); configurations run in the order listed",
            ["warm-up", "configuration", "TPOT r1 ms", "r1/later", "TTFT r1 ms", "r1/later", "CPU r1 ms",
             "CPU later ms", "CPU r1/later", "CPU rounds 2..R / later"], rows,
            notes=["TPOT = median step of a generation; TTFT and CPU time (process, whole generation): 'later' ="
                   " median over rounds 2..R", "r1/later near 1.00 for every configuration = steady state; the last"
                   " column shows how much the later rounds themselves vary"])


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
