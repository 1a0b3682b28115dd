"""The paper's experiments: the reproduction plan and its runner (``reproduce``, ``downstream``), the tables
(``report``), the demo chain and the mini study."""
