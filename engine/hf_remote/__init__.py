"""Modeling code copied into exported Hugging Face folders (engine/hf_export.py).

Nothing in this project imports these modules: they import `transformers`, which the product
does not depend on, and run only where a user loads an export with
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`. They sit here, as
files of the package, so the export can copy them and the tests can diff them.
"""
