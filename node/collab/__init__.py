"""Collaborative inference across the mesh: mixture of agents, admission control, beacon voting, verification."""
