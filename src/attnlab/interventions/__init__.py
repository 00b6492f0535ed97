"""Training-free interventions on pretrained models, scored: a registry by name, the paired scoring runner
(``attnlab eval --intervention``) and the tasks their papers target.

* :mod:`.registry` -- interventions by name with typed knobs (``NAME[:key=value,...]``, ``A+B`` composes);
* :mod:`.fit`      -- each intervention's knob-setting procedure on a validation split, and the store of fits;
* :mod:`.decoding` -- the generation loops (plain greedy, DeCoRe, DAGCD, Lookback-Lens guided) with caches;
* :mod:`.runner`   -- the paired runner (plain and intervened arms on the same samples), aggregation, report;
* :mod:`.data`     -- task names to seeded samples of a split (``test`` / ``val``);
* :mod:`.tasks`    -- the intervention tasks (multi-document QA, faithfulness, in-context learning, tool calls,
  planted content).
"""
