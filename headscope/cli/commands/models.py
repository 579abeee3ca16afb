"""``headscope models``: the shipped model organisms (name, description, folder, an example
prompt, and for a vision organism the ``--image`` its prompt needs)."""

from __future__ import annotations

import json

from headscope import zoo

NAME = "models"
HELP = "list the shipped model organisms"


def add_arguments(parser) -> None:
    pass


def run(args) -> int:
    for name, description in zoo.ORGANISMS.items():
        info = zoo.organism_info(name)
        prompt = json.dumps(zoo.EXAMPLE_PROMPTS[name][0]) if name in zoo.EXAMPLE_PROMPTS else ""
        image = f"--image {zoo.organism_path(name) / zoo.EXAMPLE_IMAGES[name]}" if name in zoo.EXAMPLE_IMAGES else ""
        print(f"{name}\t{info.get('description', description)}\t{zoo.organism_path(name)}\t{prompt}\t{image}".rstrip("\t"))
    return 0
