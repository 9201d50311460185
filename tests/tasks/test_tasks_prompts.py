"""Exact rendered prompts: one real record per task, and the bring-your-own format."""

from __future__ import annotations

from blob_lora.tasks import MCExample, get_task


def _by_id(task, split, rid):
    return next(ex for ex in task.load(split) if ex.id == rid)


def test_winogrande_prompt(data_root):
    task = get_task("winogrande_s", data_root)
    ex = task.load("validation")[0]
    assert task.render_prompt(ex) == (
        "Sentence: Sarah was a much better surgeon than Maria so _ always got the easier cases.\n"
        "Which option fills the blank (_)?\n"
        "A) Sarah\n"
        "B) Maria\n"
        "Answer:"
    )


def test_arc_challenge_prompt_three_options(data_root):
    task = get_task("arc_challenge", data_root)
    ex = _by_id(task, "validation", "NYSEDREGENTS_2014_4_4")
    assert task.render_prompt(ex) == (
        "Question: Which state of matter has no definite volume and no definite shape?\n"
        "A) gas\n"
        "B) liquid\n"
        "C) solid\n"
        "Answer:"
    )


def test_arc_numeric_labels_render_as_letters(data_root):
    task = get_task("arc_challenge", data_root)
    ex = _by_id(task, "validation", "NYSEDREGENTS_2014_8_38")
    assert task.render_prompt(ex) == (
        "Question: A substance in the solid phase (state) of matter has\n"
        "A) a definite shape and a definite volume\n"
        "B) a definite shape, but no definite volume\n"
        "C) no definite shape, but a definite volume\n"
        "D) no definite shape and no definite volume\n"
        "Answer:"
    )


def test_arc_easy_prompt(data_root):
    task = get_task("arc_easy", data_root)
    ex = task.load("validation")[0]
    assert ex.id == "MCAS_2000_4_6"
    assert task.render_prompt(ex) == (
        "Question: Which technology was developed most recently?\n"
        "A) cellular telephone\n"
        "B) television\n"
        "C) refrigerator\n"
        "D) airplane\n"
        "Answer:"
    )


def test_openbookqa_prompt(data_root):
    task = get_task("openbookqa", data_root)
    ex = task.load("validation")[0]
    assert (ex.id, ex.label) == ("8-376", 0)
    assert task.render_prompt(ex) == (
        "Question: Frilled sharks and angler fish live far beneath the surface of the ocean, "
        "which is why they are known as\n"
        "A) Deep sea animals\n"
        "B) fish\n"
        "C) Long Sea Fish\n"
        "D) Far Sea Animals\n"
        "Answer:"
    )


def test_boolq_prompt(data_root):
    task = get_task("boolq", data_root)
    ex = task.load("validation")[2644]  # line 2645, the shortest passage
    assert ex.label == 0  # answer true -> "True"
    assert task.render_prompt(ex) == (
        "Passage: The Punisher (season 2) -- The season is set for release in 2019.\n"
        "Question: are they going to make a punisher season 2?\n"
        "True or False?\n"
        "Answer:"
    )


def test_mmlu_prompt(data_root):
    task = get_task("mmlu:college_physics", data_root)
    ex = task.load("test")[0]
    assert ex.label == 1
    assert task.render_prompt(ex) == (
        "Question: The quantum efficiency of a photon detector is 0.1. If 100 photons are sent "
        "into the detector, one after the other, the detector will detect photons\n"
        "A) an average of 10 times, with an rms deviation of about 4\n"
        "B) an average of 10 times, with an rms deviation of about 3\n"
        "C) an average of 10 times, with an rms deviation of about 1\n"
        "D) an average of 10 times, with an rms deviation of about 0.1\n"
        "Answer:"
    )


def test_generic_prompt_with_context(data_root):
    task = get_task("arc_easy", data_root)
    ex = MCExample("x", "What is 2+2?", ("3", "4"), 1, context="Arithmetic.")
    assert task.render_prompt(ex) == (
        "Context: Arithmetic.\nQuestion: What is 2+2?\nA) 3\nB) 4\nAnswer:"
    )
