"""FPS attention: FP8 3D-tile fake quantization, 3D-tile sparsity and the step-aware schedule (the PyTorch
reference of the numerics contract in DESIGN.md, and the transform that puts it into a built Wan model)."""
