"""The run folder as a whole, beyond any one rank: what a run resumes from, and which job may write to it."""
