"""Corpus analysis: every audio file under folders, journalled, resumable, with CSV and Markdown reports."""

from runtime.corpus.report import CorpusSummary
from runtime.corpus.runner import AudioFile, analyze_corpus, analyze_one, find_audio, local_results, run_corpus

__all__ = ["AudioFile", "CorpusSummary", "analyze_corpus", "analyze_one", "find_audio", "local_results",
           "run_corpus"]
