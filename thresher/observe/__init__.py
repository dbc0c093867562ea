"""Looking at runs: ``thresher report`` (figures of one or several runs) and ``thresher rollouts``
(what was kept and rejected, prompt by prompt). Both read a run directory as written, live or not."""
