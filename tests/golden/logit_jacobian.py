"""Reference for tests/logit_jacobian.rs: per sample, the Jacobian of the eval-mode (running
BatchNorm statistics) logits with respect to element 0 of every named parameter, by torch.func's
jacrev as VKDNW's authors compute it, on the first N shipped probe images, float64.

    pip install torch==2.8.0 onnx==1.23.2 numpy
    python3 tests/golden/logit_jacobian.py     # writes tests/golden/logit_jacobian/<fixture>.npy
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import scorers  # noqa: E402
from make_fixtures import FIXTURES, ROOT, cifar_probe  # noqa: E402

N = 8
NAME = "nb201_random_b"


def main():
    x, _ = cifar_probe(N)
    i = list(FIXTURES).index(NAME)
    model = scorers.load_fixture(i, NAME, FIXTURES[NAME])
    jac, _ = scorers.logit_jacobian(model, x)
    out = os.path.join(ROOT, "tests", "golden", "logit_jacobian")
    os.makedirs(out, exist_ok=True)
    np.save(os.path.join(out, f"{NAME}.npy"), jac.numpy())
    print(NAME, tuple(jac.shape))


if __name__ == "__main__":
    main()
