"""Is a trainer resumable? `check_resume(make_trainer)` trains it once without interruption
and once interrupted at hard points, resuming into fresh trainers, and reports the first
difference bit for bit, with the attributes of the user's code that a resume loses
(docs/resume_check.md). `mini-trainer check-resume CONFIG` is the same from a config."""

from .check import check_resume, choose_interruptions
from .report import Difference, Interruption, ResumeReport, UnsavedAttribute

__all__ = ["Difference", "Interruption", "ResumeReport", "UnsavedAttribute", "check_resume", "choose_interruptions"]
