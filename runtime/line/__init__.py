"""The line: the station and its recipes, frame sources, the engine, records and the sinks to the plant."""
