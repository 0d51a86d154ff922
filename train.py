"""Trains a conv net with bnjax.BatchNorm (placeholder until the training program lands)."""

if __name__ == "__main__":
    print("train.py will train a 1D conv net with bnjax.BatchNorm on MNIST-1D; not built yet.")
