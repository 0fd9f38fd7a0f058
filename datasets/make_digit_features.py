"""Train the digit classifier of chapter 11b and write its weights to `datasets/digit_features.npz`.

The Fréchet Digit Distance (FDD, `hitlib.digit_features`) is computed in the penultimate-layer features of this small
convnet, trained on 4,000 of the embedded MNIST digits (400 per class; 100 per class held out for the test accuracy).
Training is seeded (split, initialisation, batch order), takes about 20 s on two CPU cores, and is the same code that
chapter 11b runs; on another machine the last bits of the weights may differ, which is why the weights are shipped and
every FDD is computed with them.

    python datasets/make_digit_features.py [OUTPUT.npz] [--seed 0] [--epochs 10]
"""
import argparse
import hashlib
import sys
from pathlib import Path

from hitlib import digit_features


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output", type=Path, nargs="?", default=Path(__file__).with_name("digit_features.npz"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args(argv)
    model, test_accuracy = digit_features.train_digit_classifier(seed=args.seed, epochs=args.epochs, verbose=True)
    digit_features.save_feature_model(model, args.output, test_accuracy)
    digest = hashlib.sha256(args.output.read_bytes()).hexdigest()
    print(f"wrote {args.output}: test accuracy {test_accuracy:.4f}, {args.output.stat().st_size} bytes, sha256 {digest}")


if __name__ == "__main__":
    main(sys.argv[1:])
