"""mllm_sparse_recipes: the applications built on the three libraries, and the `mllm-sparse` command line.

The recipes chain the libraries' stages into runs: `quickstart` (the whole pipeline on the synthetic world),
`ablation` (the token-budget ablation), `scene_llm` (teaching a tiny LLM the synthetic world's QA), `demo` (the
Gradio chat); `stages` keeps a run's folder (done markers, settings), `defaults` the settings they share. The
libraries (`mllm_sparse`, `bootstrap`, `llava_adapter`) never import this package.
"""
