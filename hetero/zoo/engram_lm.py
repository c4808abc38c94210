"""A transformers decoder with Engram blocks before chosen layers (the zoo's engram models).

The wrapper runs the decoder's own loop (embeddings, causal mask, rotary embeddings, layers, norm,
head) and calls an Engram block before each chosen layer. Hyper-connections are mocked as in the
paper's demo: the block sees `hc_mult` copies of the residual stream and its branches are averaged
back. The n-gram context a decode step needs (the last max_ngram - 1 tokens) travels in the cache.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hetero.zoo.engram import Engram, EngramConfig, head_primes, initial_context, next_context


def engram_cache_class() -> type:
    from transformers import DynamicCache

    class EngramCache(DynamicCache):
        """A DynamicCache that also remembers each sequence's last tokens, for the n-gram hashes."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.ngram_context: torch.Tensor | None = None

    return EngramCache


class EngramCausalLM(nn.Module):
    def __init__(self, base: nn.Module, engram: EngramConfig, layer_ids: tuple[int, ...]) -> None:
        super().__init__()
        self.base = base
        self.config = base.config
        self.engram_config = engram
        primes = head_primes(engram, list(layer_ids))
        self.engrams = nn.ModuleDict({str(i): Engram(engram, i, primes[i]) for i in layer_ids})

    def forward(self, input_ids: torch.Tensor, past_key_values: Any = None, use_cache: bool = True) -> Any:
        from transformers.masking_utils import create_causal_mask
        from transformers.modeling_outputs import CausalLMOutputWithPast

        model = self.base.model
        previous = getattr(past_key_values, "ngram_context", None)
        if previous is None:
            previous = initial_context(self.engram_config, input_ids.shape[0], input_ids.device)
        embeds = model.embed_tokens(input_ids)
        seen = past_key_values.get_seq_length() if past_key_values is not None else 0
        position_ids = (torch.arange(input_ids.shape[1], device=input_ids.device) + seen).unsqueeze(0)
        mask = create_causal_mask(
            config=model.config,
            inputs_embeds=embeds,
            attention_mask=None,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )
        rotary = model.rotary_emb(embeds, position_ids)
        hidden = embeds
        for index, layer in enumerate(model.layers):
            engram = self.engrams[str(index)] if str(index) in self.engrams else None
            if engram is not None:
                branches = hidden.unsqueeze(2).expand(-1, -1, self.engram_config.hc_mult, -1)
                hidden = engram(branches, input_ids, previous).mean(2)
            hidden = layer(
                hidden,
                position_embeddings=rotary,
                attention_mask=mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
            )
        logits = self.base.lm_head(model.norm(hidden))
        if past_key_values is not None:
            past_key_values.ngram_context = next_context(previous, input_ids)
        return CausalLMOutputWithPast(logits=logits, past_key_values=past_key_values)
