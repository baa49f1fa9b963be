"""How much imprecision a planar task's oracle survives: its own actions perturbed the way a
learned policy's are (Gaussian noise of ``--noise`` action units, and zero-order hold of each
action for ``--hold`` steps, i.e. acting open loop between requests), success and p1 over
``--episodes`` seeds per cell (the demo generator's seeds, ``bench.experts.run_planar_task``).

If the oracle survives noise closed loop but a trained policy scores 0, the policy's errors
are systematic (an under-fitted model), not the task's sensitivity to noise.

    python -m bench.oracle_robustness --task BlockPush --episodes 20 --oracle-noise 0

``--oracle-noise 0`` measures Block Push's bare feedback law (its demos add Ornstein-Uhlenbeck
noise of 0.15 on top; without the flag the oracle runs as the demo generator runs it).

Writes ``bench/results/oracle_robustness.json`` and prints the table.
"""

from __future__ import annotations

from bench.common import arg_parser, parse_args, write_results
from bench.experts import run_planar_task


def main(argv=None) -> None:
    ap = arg_parser(__doc__)
    ap.add_argument("--task", default="BlockPush")
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noise", default="0,0.2,0.5", help="comma list of noise std (action units)")
    ap.add_argument("--hold", default="1,2,4", help="comma list of hold lengths (control steps)")
    ap.add_argument("--oracle-noise", type=float, default=None,
                    help="the oracle's own demo noise (Block Push; default: as in the demos, 0: the bare law)")
    args = parse_args(ap, argv)
    rows = []
    for hold in map(int, args.hold.split(",")):
        for noise in map(float, args.noise.split(",")):
            r = run_planar_task(args.task, args.episodes, args.seed, noise_std=noise, hold=hold,
                                oracle_noise=args.oracle_noise)
            rows.append({"task": r["task"], "hold": hold, "noise_std": noise, "episodes": r["n_episodes"],
                         "success_rate": r["success_rate"], "p1_rate": r["p1_rate"],
                         "mean_length": round(r["mean_length"], 1),
                         "mean_action_change": round(r["mean_action_change"], 4)})
            print(rows[-1], flush=True)
    write_results("oracle_robustness", {"task": args.task, "episodes": args.episodes, "seed": args.seed,
                                        "oracle_noise": "default" if args.oracle_noise is None else args.oracle_noise,
                                        "seeds": f"{args.seed}..{args.seed + args.episodes - 1}"}, rows)


if __name__ == "__main__":
    main()
