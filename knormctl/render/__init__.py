"""Tables, exports and figures built from stored rows (never imports the engine).

``summary`` aggregates (pure Python); ``export`` writes json/csv/markdown; ``tables``
draws rich tables; ``figures`` draws matplotlib figures. Import the submodule you need:
rich and matplotlib are loaded only by the modules that draw.
"""
