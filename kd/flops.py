"""Matmul FLOP counts of BERT MLM forwards: the shared yardstick of MFU and equal-compute plots."""


def forward_flops(layers: int, hidden: int, ffn: int, seq_len: int, tokens: int, predicted: int,
                  vocab: int) -> float:
    """Matmul FLOPs of a BERT MLM forward with the head at `predicted` positions only.

    per token and layer: 2*(4*h^2 + 2*h*ffn) for Q,K,V,O and the FFN, plus 4*S*h for QK^T and AV;
    per predicted position: 2*h^2 (head transform) + 2*h*V (decoder)."""
    per_token_layer = 2 * (4 * hidden * hidden + 2 * hidden * ffn) + 4 * seq_len * hidden
    return tokens * layers * per_token_layer + predicted * (2 * hidden * hidden + 2 * hidden * vocab)


def config_flops(config: dict, seq_len: int, tokens: int, predicted: int) -> float:
    """forward_flops from a Hugging Face BertConfig dict (config.json)."""
    return forward_flops(config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"],
                         seq_len, tokens, predicted, config["vocab_size"])
