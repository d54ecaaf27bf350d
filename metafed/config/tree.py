"""The shape of the run configuration: which section sits where. Each section is declared
beside the component that reads it; this module only assembles them."""
from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from metafed.aggregate.config import AggregationSection
from metafed.algorithms import ALGORITHMS
from metafed.asynchrony import ScheduleSection
from metafed.backends.config import ExecutionSection
from metafed.client.config import TrainingSection
from metafed.compression.config import CompressionSection
from metafed.data.config import DataSection
from metafed.eval import EvaluationSection
from metafed.incentive.config import IncentivesSection
from metafed.privacy.config import PrivacySection
from metafed.section import Section
from metafed.simulate.config import SimulateSection

# the root's sections in order (the algorithm's, a union over the registry, comes second)
SECTIONS: dict[str, type[Section]] = {
    "data": DataSection, "training": TrainingSection, "aggregation": AggregationSection,
    "privacy": PrivacySection, "compression": CompressionSection, "schedule": ScheduleSection,
    "incentives": IncentivesSection, "evaluation": EvaluationSection, "execution": ExecutionSection,
    "simulate": SimulateSection,
}

# algorithm name -> its section (every algorithm in the registry declares one)
ALGORITHM_SECTIONS: dict[str, type[Section]] = {name: spec.section for name, spec in ALGORITHMS.items()}

AlgorithmSection = Annotated[Union[tuple(ALGORITHM_SECTIONS.values())], Field(discriminator="name")]
