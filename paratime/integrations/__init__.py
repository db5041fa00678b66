"""Integrations with other libraries (above the sampler): diffusers models and schedulers
(:mod:`paratime.integrations.diffusers`) and one-line parallel pipelines (:mod:`paratime.integrations.pipelines`,
``paratime.parallelize``). Nothing here is imported by ``import paratime``: diffusers stays an optional extra."""
