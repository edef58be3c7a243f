"""The frozen feature extractor: where its weights come from and how it becomes a TF Hub module.

handles.py resolves a handle (the bundled checkpoint, a SavedModel folder, a URL) to a
`Backbone`; checkpoint.py reads the bundled PyTorch weights; mobilenet.py is the network graph, built stage
by stage (stages.py: the stages and where the network can be cut between them);
hub_module.py exports a network as a TF Hub module with its preprocessing inside.
"""
