"""Storage both roles read: the Chroma collections and a train job's examples."""
