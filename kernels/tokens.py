"""The token ids the data kernels write in their "tokens" layout: bits 0 and 1, then SEPARATOR before the chain."""
SEPARATOR = 2
