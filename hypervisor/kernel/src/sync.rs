//! Interrupt-safe locking.
//!
//! An interrupt handler (anything installed with [`crate::arch::idt::register`]) runs on the
//! stack of the code it interrupted. If that code holds a spin lock the handler then takes,
//! the CPU spins on a lock its own interrupted code can never release. [`IrqMutex`] closes that
//! hole: it disables interrupts on this CPU *before* it takes the lock and restores the
//! previous RFLAGS.IF only *after* releasing it, so no interrupt can arrive on this CPU while
//! it holds the lock. Other CPUs still contend normally.
//!
//! Use it for every lock an interrupt handler also takes (the console, the VT-d units and
//! fault queues). The handler itself may still use [`IrqMutex::try_lock`] where waiting is
//! the wrong answer (the VT-d fault path leaves a drain pending instead of spinning on a lock
//! another CPU holds).
//!
//! Guards restore the interrupt flag each saw when its lock was taken, so nested guards must
//! be released in the reverse order of acquisition (as scoped guards are); releasing an outer
//! guard first would turn interrupts back on while the inner lock is still held.

use core::marker::PhantomData;
use core::mem::ManuallyDrop;
use core::ops::{Deref, DerefMut};

use x86_64::instructions::interrupts;

/// A spin lock whose guard keeps interrupts disabled on this CPU while it is held.
pub struct IrqMutex<T> {
    inner: spin::Mutex<T>,
}

/// Holds an [`IrqMutex`] with interrupts off; restores the interrupt flag when dropped.
///
/// Not `Send`: the saved interrupt flag belongs to the CPU that took the lock.
pub struct IrqMutexGuard<'a, T> {
    guard: ManuallyDrop<spin::MutexGuard<'a, T>>,
    interrupts_were_enabled: bool,
    _not_send: PhantomData<*mut ()>,
}

impl<T> IrqMutex<T> {
    /// A new unlocked mutex holding `value`.
    pub const fn new(value: T) -> Self {
        Self {
            inner: spin::Mutex::new(value),
        }
    }

    /// Disables interrupts on this CPU, then spins until the lock is free.
    pub fn lock(&self) -> IrqMutexGuard<'_, T> {
        let was = interrupts::are_enabled();
        interrupts::disable();
        IrqMutexGuard {
            guard: ManuallyDrop::new(self.inner.lock()),
            interrupts_were_enabled: was,
            _not_send: PhantomData,
        }
    }

    /// Takes the lock if it is free (interrupts off while held); otherwise returns `None` with
    /// the interrupt flag as it was.
    pub fn try_lock(&self) -> Option<IrqMutexGuard<'_, T>> {
        let was = interrupts::are_enabled();
        interrupts::disable();
        match self.inner.try_lock() {
            Some(g) => Some(IrqMutexGuard {
                guard: ManuallyDrop::new(g),
                interrupts_were_enabled: was,
                _not_send: PhantomData,
            }),
            None => {
                if was {
                    interrupts::enable();
                }
                None
            }
        }
    }

    /// Whether some CPU holds the lock (a hint: it may change at once).
    pub fn is_locked(&self) -> bool {
        self.inner.is_locked()
    }

    /// Releases the lock whoever holds it.
    ///
    /// # Safety
    /// Only for fatal paths that will never return to the holder (it may have faulted); the
    /// holder's guard must never be used or dropped afterwards while another holder exists.
    pub unsafe fn force_unlock(&self) {
        // SAFETY: contract above.
        unsafe { self.inner.force_unlock() }
    }
}

impl<T> Deref for IrqMutexGuard<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T> DerefMut for IrqMutexGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.guard
    }
}

impl<T> Drop for IrqMutexGuard<'_, T> {
    fn drop(&mut self) {
        // SAFETY: dropped exactly once, here, and never used again.
        unsafe { ManuallyDrop::drop(&mut self.guard) };
        if self.interrupts_were_enabled {
            interrupts::enable();
        }
    }
}
