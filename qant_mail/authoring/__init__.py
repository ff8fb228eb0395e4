"""Writing and rendering an issue: the model, loading, prose, typography, images, the
render, its lints, the archive. Knows nothing of readers or SMTP."""
