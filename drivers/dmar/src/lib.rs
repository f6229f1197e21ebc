//! Parser for the ACPI DMA Remapping (DMAR) table.
#![no_std]
