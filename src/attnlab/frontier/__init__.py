"""The frontier: every inference-time sparse / KV method x budget x task x length on real models, one report.

``attnlab.frontier.report`` turns the runner's rows into statistics (bootstrap CIs, Pareto fronts, the
claims), plots and Markdown.
"""
