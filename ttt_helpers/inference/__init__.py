"""Running a trained TTT model fast and as a stream.

`generate.py`: streaming generation and chat that keep the TTT state (or the KV cache) between
calls; `fused_projections.py`: each block's products that read one input as one matrix product;
`cuda_graphs.py`: a whole model's decode step and prefill replayed from CUDA graphs.
"""
