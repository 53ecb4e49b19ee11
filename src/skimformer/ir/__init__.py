"""ir: load exported programs and find their transformer structure."""
from skimformer.ir.loader import load, load_program
from skimformer.ir.program import Model, Program
from skimformer.ir.structure import Structure, analyze

__all__ = ["Model", "Program", "Structure", "analyze", "load", "load_program"]
