"""Object hallucination of image-text models: CHAIR on captions, POPE on yes/no questions.

- CHAIR (Rohrbach et al. 2018, "Object Hallucination in Image Captioning"): the objects a caption
  mentions, each counted once per caption, against the objects truly in the image.
  CHAIR_i = hallucinated mentions / all mentions; CHAIR_s = captions with at least one
  hallucinated object / all captions. Lower is better.
- POPE (Li et al. 2023, "Evaluating Object Hallucination in Large Vision-Language Models"):
  "Is there a <object> in the image?" for each object in the image (answer yes) and as many
  absent ones (answer no), drawn at random, by popularity (the most frequent objects of the data)
  or adversarially (the objects that co-occur most with those present). Accuracy, precision,
  recall and F1 of "yes", and the share of "yes" answers, per setting.

See docs/METHODS.md (evaluation measures). The generation helpers run whatever edits are active on
the HeadModel (``intervene``, ``ablate``), so the metrics can be compared with and without them.
"""

from __future__ import annotations

import random
import re
import string
from typing import Iterable, Mapping, Sequence

import torch

from headscope import vision
from headscope.errors import HeadscopeError

SETTINGS = ("random", "popular", "adversarial")


# ----------------------------------------------------------------------------------- CHAIR
def mentioned_objects(caption: str, vocabulary: Iterable[str]) -> set[str]:
    """The vocabulary objects a caption names (whole words, case-insensitive), each once."""
    words = set(re.findall(r"[a-z]+", caption.lower()))
    return {obj for obj in vocabulary if obj.lower() in words}


def chair(captions: Sequence[str], truths: Sequence[Iterable[str]], vocabulary: Iterable[str]) -> dict[str, float]:
    """CHAIR_i, CHAIR_s (Rohrbach et al. 2018) and the share of true objects mentioned (``recall``).

    ``truths[i]`` are the objects in image i. Captions that mention no object count in CHAIR_s's
    denominator; CHAIR_i is 0 when no caption mentions anything.
    """
    if len(captions) != len(truths):
        raise HeadscopeError(f"CHAIR needs one set of true objects per caption; got {len(captions)} captions "
                             f"and {len(truths)} object sets")
    vocabulary = list(vocabulary)
    mentions = hallucinated = bad_captions = found = present = 0
    for caption, truth in zip(captions, truths):
        truth = set(truth)
        said = mentioned_objects(caption, vocabulary)
        wrong = said - truth
        mentions += len(said)
        hallucinated += len(wrong)
        bad_captions += bool(wrong)
        found += len(said & truth)
        present += len(truth)
    return {
        "chair_i": hallucinated / mentions if mentions else 0.0,
        "chair_s": bad_captions / len(captions) if captions else 0.0,
        "recall": found / present if present else 0.0,
    }


# ----------------------------------------------------------------------------------- POPE
def pope_questions(
    truths: Sequence[Iterable[str]],
    vocabulary: Sequence[str],
    setting: str,
    frequency: Mapping[str, float] | None = None,
    cooccurrence: Mapping[tuple[str, str], float] | None = None,
    seed: int = 0,
) -> list[tuple[int, str, bool]]:
    """POPE's questions as ``(image index, object, answer is yes)``.

    Per image: every object in it (yes) and as many absent objects (no), as many as there are:
    ``random`` draws them uniformly, ``popular`` takes the most frequent (``frequency``),
    ``adversarial`` those with the highest summed co-occurrence with the image's objects
    (``cooccurrence[(present, candidate)]``). Ties go to vocabulary order.
    """
    if setting not in SETTINGS:
        raise HeadscopeError(f"unknown POPE setting {setting!r}; choose from {', '.join(SETTINGS)}")
    if setting == "popular" and frequency is None:
        raise HeadscopeError("POPE's popular setting needs object frequencies")
    if setting == "adversarial" and cooccurrence is None:
        raise HeadscopeError("POPE's adversarial setting needs co-occurrence counts")
    rng = random.Random(seed)
    out = []
    for index, truth in enumerate(truths):
        present = [o for o in vocabulary if o in set(truth)]
        absent = [o for o in vocabulary if o not in set(truth)]
        k = min(len(present), len(absent))
        if setting == "random":
            negatives = rng.sample(absent, k)
        elif setting == "popular":
            negatives = sorted(absent, key=lambda o: -frequency.get(o, 0.0))[:k]
        else:
            def together(o: str) -> float:
                return sum(cooccurrence.get((p, o), 0.0) for p in present)

            negatives = sorted(absent, key=lambda o: -together(o))[:k]
        out += [(index, o, True) for o in present] + [(index, o, False) for o in negatives]
    return out


def pope_metrics(answers: Sequence[bool], labels: Sequence[bool]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (of "yes") and the share of "yes" answers (Li et al. 2023)."""
    if len(answers) != len(labels) or not answers:
        raise HeadscopeError(f"POPE needs as many answers as labels, at least one; got {len(answers)} and {len(labels)}")
    tp = sum(a and y for a, y in zip(answers, labels))
    fp = sum(a and not y for a, y in zip(answers, labels))
    fn = sum((not a) and y for a, y in zip(answers, labels))
    tn = len(answers) - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"acc": (tp + tn) / len(answers), "precision": precision, "recall": recall, "f1": f1,
            "yes_share": (tp + fp) / len(answers)}


def says_yes(answer: str) -> bool:
    """POPE's parsing: "no" if the answer contains the word no or not, else "yes"."""
    words = set(re.findall(r"[a-z]+", answer.lower()))
    return not ({"no", "not"} & words)


# ----------------------------------------------------------------------------------- generation
def generate_texts(hm, images, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy continuations of (image, prompt) pairs (``vision.encode``: left padding); only the new text."""
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = vision.encode(hm, images[start : start + batch_size], prompts[start : start + batch_size])
        with torch.no_grad():
            out = hm.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[:, batch["input_ids"].shape[1]:]
        texts += [t.strip() for t in hm.processor.tokenizer.batch_decode(new, skip_special_tokens=True)]
    return texts


def caption_metrics(hm, images, truths, vocabulary, prompt: str, max_new_tokens: int = 24,
                    batch_size: int = 16) -> tuple[dict[str, float], list[str]]:
    """CHAIR of greedy captions of ``images`` (one ``prompt`` for all) and the captions."""
    captions = generate_texts(hm, images, [prompt] * len(images), max_new_tokens, batch_size)
    return chair(captions, truths, vocabulary), captions


def check_template(template: str, option: str) -> None:
    """A format string whose only field is ``{object}`` (literal braces doubled: ``{{`` ``}}``)."""
    hint = f"{option} {template!r}: the only field allowed is {{object}} (write {{{{ and }}}} for literal braces)"
    try:
        fields = [name for _, name, spec, conversion in string.Formatter().parse(template) if name is not None]
        template.format(object="x")
    except (ValueError, KeyError, IndexError, AttributeError, TypeError):
        raise HeadscopeError(hint) from None
    if any(name != "object" for name in fields):
        raise HeadscopeError(hint)


def pope(hm, images, questions: Sequence[tuple[int, str, bool]], template: str,
         max_new_tokens: int = 3, batch_size: int = 16) -> dict[str, float]:
    """POPE metrics of the model's answers to ``questions`` (``template`` has an ``{object}`` slot)."""
    check_template(template, "the POPE question template")
    prompts = [template.format(object=obj) for _, obj, _ in questions]
    answers = generate_texts(hm, [images[i] for i, _, _ in questions], prompts, max_new_tokens, batch_size)
    return pope_metrics([says_yes(a) for a in answers], [label for _, _, label in questions])


def hallucination_metrics(hm, images, truths, vocabulary, *, caption_prompt: str, question_template: str,
                          frequency=None, cooccurrence=None, settings: Sequence[str] = SETTINGS, seed: int = 0,
                          batch_size: int = 16, max_new_tokens: int = 24) -> dict[str, float]:
    """CHAIR and POPE on one image set, as one flat dict ending with chair_i, chair_s, pope_acc, pope_f1.

    ``pope_<setting>_<metric>`` per setting; ``pope_acc`` and ``pope_f1`` are their means over the
    settings; ``caption_recall`` is the share of true objects the captions name.
    """
    caps, _ = caption_metrics(hm, images, truths, vocabulary, caption_prompt, max_new_tokens, batch_size)
    out: dict[str, float] = {}
    for setting in settings:
        questions = pope_questions(truths, list(vocabulary), setting, frequency, cooccurrence, seed)
        for name, value in pope(hm, images, questions, question_template, batch_size=batch_size).items():
            out[f"pope_{setting}_{name}"] = value
    out["caption_recall"] = caps["recall"]
    out["chair_i"], out["chair_s"] = caps["chair_i"], caps["chair_s"]
    out["pope_acc"] = sum(out[f"pope_{s}_acc"] for s in settings) / len(settings)
    out["pope_f1"] = sum(out[f"pope_{s}_f1"] for s in settings) / len(settings)
    return out
