"""What the application does with results: ``annotate`` draws a result's boxes on its frame;
``ask`` answers a caption asked now over sources' last minutes from the track stage's memory."""
