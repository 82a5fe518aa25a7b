"""Workshop exercises: one check function per exercise in the chapters, one module per chapter.

Every check function takes the chapter's own objects (a caption, ``stats``, ``base``, ``cap``, a
table, ...) and the learner's ``answer``; it recomputes the right answer from those objects (never a
number written down here), prints one line that says whether the answer is right and, when it is
not, a hint aimed at the likely mistake, and returns True or False. It never raises on a wrong
answer, and an unanswered exercise (``answer = None``) prints "not answered yet" and a hint, so the
chapter runs from top to bottom as committed.

Where things are: `mabook.exercises.registry` holds the registry (`CHECKS`, `WHERE`, the
`~mabook.exercises.registry.chapter` decorator) and the verdicts a check returns;
`mabook.exercises.answers` reads answers and compares them; ``ch0`` ... ``ch6`` (and ``ch2b``, ``ch2c``, the
interludes) hold each chapter's checks. This package re-exports every check, so a chapter calls
``exercises.check_xxx`` after ``from mabook import exercises``.

How to add an exercise to a chapter (the pattern every chapter follows)
-----------------------------------------------------------------------

1. In the chapter's module (``mabook/exercises/chN.py``, whose ``exercise = chapter("notebooks/<chapter>.ipynb")``
   names the notebook once): a check function decorated with ``@exercise("N.M", "title")`` (N: the
   chapter's number as in its title, e.g. ``"2b"``, checked against the notebook's name; M: the
   exercise's order in the chapter), the only place where the number is written. It recomputes the
   answer from the objects it is given, compares, and returns a verdict: ``right(detail)``,
   ``wrong(problem, hint)``, ``not_answered(hint)`` or ``cannot_check(why)``; the registry prints it
   under the exercise's number. Import the check here and add it to ``__all__``. Checks must be cheap
   (well under a second on a CPU, apart from a single small generation) and must work on small
   inputs: ``tests/test_exercises.py`` gives every check in `CHECKS` a right and a wrong answer
   (a test fails if a check has no case there).
2. In the chapter, at the end of the section the exercise practises, three cells:

   - markdown: ``### Exercise N.M — <title>`` and the task;
   - code, the learner's cell, which must run as committed::

         answer = None  # TODO: <what to compute, and its type>
         exercises.check_xxx(<chapter objects>, answer);

     (the ``;`` keeps Jupyter from echoing the returned bool; for a "write a function" exercise
     the cell defines the function with ``return None  # TODO`` and passes the function);
   - code, the solution: the same call with the answer computed, tagged ``hide-cell`` with cell
     metadata ``{"mystnb": {"code_prompt_show": "Show solution", "code_prompt_hide": "Hide
     solution"}}``, so the page shows it collapsed behind a "Show solution" toggle. nbmake executes
     it with the chapter, so a solution that stops being right fails the tests. Solution cells name
     their variables with an ``ex`` prefix (``ex_values``) so they never overwrite the chapter's.

   ``tests/test_exercises.py`` checks this layout in every chapter (2-3 exercises each), and
   ``book/workshop.md`` lists the exercises for the half-day plan.
"""

from mabook.exercises.ch0 import check_attribute_accuracy, check_object_fraction, check_wrong_attributes
from mabook.exercises.ch1 import check_jaccard, check_ratio_to_median, check_top_channels
from mabook.exercises.ch2 import check_bottom_rms, check_token_mean_op, check_zeroed_top1_mse
from mabook.exercises.ch2b import check_half_final_step, check_plateau_change
from mabook.exercises.ch2c import check_catch_up_step, check_share_at_width, check_share_versus
from mabook.exercises.ch3 import check_kmeans_mask, check_token_iou
from mabook.exercises.ch4 import check_pixel_blend, check_took_attribute
from mabook.exercises.ch5 import check_noised_latents, check_reconstruction_error
from mabook.exercises.ch6 import check_eta_scaling, check_sink_random_ratio, check_top1_sinks
from mabook.exercises.registry import CHECKS, WHERE, OrganismOnly

__all__ = [
    "CHECKS", "WHERE", "OrganismOnly",
    "check_object_fraction", "check_wrong_attributes", "check_attribute_accuracy",
    "check_top_channels", "check_ratio_to_median", "check_jaccard",
    "check_zeroed_top1_mse", "check_bottom_rms", "check_token_mean_op",
    "check_half_final_step", "check_plateau_change",
    "check_share_at_width", "check_share_versus", "check_catch_up_step",
    "check_kmeans_mask", "check_token_iou",
    "check_pixel_blend", "check_took_attribute",
    "check_noised_latents", "check_reconstruction_error",
    "check_top1_sinks", "check_sink_random_ratio", "check_eta_scaling",
]
