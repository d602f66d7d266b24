"""The privacy accountant's oracle: Google's `dp-accounting` library (RdpAccountant, default orders).

For a grid of DP-SGD settings — Poisson sampling rate q, noise multiplier sigma, steps, delta — it
writes OUT_DIR/cases.json: the RDP at every default order after composing the steps, and the epsilon
and order the library's (epsilon, delta) conversion gives. tests/common/core/dp_accountant_test.cpp
checks FlexFed's accountant against it. Offline. Usage: dp_accounting_cases.py OUT_DIR
"""

import json
from importlib import metadata
import os
import sys

import dp_accounting
from dp_accounting.rdp import rdp_privacy_accountant as rdp

SETTINGS = [  # (q, sigma, steps, delta)
    (0.01, 1.0, 1000, 1e-5),
    (0.01, 0.5, 200, 1e-5),
    (0.004, 1.1, 10000, 1e-6),
    (0.05, 2.0, 500, 1e-5),
    (0.2, 0.8, 50, 1e-4),
    (0.001, 4.0, 100000, 1e-7),
    (1.0, 3.0, 10, 1e-5),
    (0.02, 100.0, 1000, 1e-5),
    (0.3, 0.3, 5, 1e-3),
]


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    cases = []
    for q, sigma, steps, delta in SETTINGS:
        accountant = rdp.RdpAccountant()
        event = dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
        accountant.compose(event)
        epsilon, order = accountant.get_epsilon_and_optimal_order(delta)
        cases.append({"q": q, "sigma": sigma, "steps": steps, "delta": delta,
                      "orders": [float(o) for o in accountant._orders],
                      "rdp": [float(r) if r != float("inf") else None for r in accountant._rdp],
                      "epsilon": float(epsilon), "order": float(order)})
    with open(os.path.join(out, "cases.json.tmp"), "w") as f:
        json.dump({"library": "dp-accounting " + metadata.version("dp-accounting"), "cases": cases}, f)
    os.replace(os.path.join(out, "cases.json.tmp"), os.path.join(out, "cases.json"))
    print(f"{len(cases)} accountant cases written to {out}/cases.json")


if __name__ == "__main__":
    main()
