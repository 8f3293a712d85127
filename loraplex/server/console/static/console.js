// The console's small behaviours, each a progressive enhancement (the forms work without it).
"use strict";

// Split sliders: show each weight and the total; the button waits until they add up to 100.
function wireSplit(form) {
  const sliders = form.querySelectorAll('input[type="range"]');
  const total = form.querySelector("[data-split-total]");
  const button = form.querySelector('button[type="submit"]');
  function update() {
    let sum = 0;
    sliders.forEach((slider) => {
      sum += Number(slider.value);
      const shown = form.querySelector(`output[for="${slider.id}"]`);
      if (shown) shown.textContent = slider.value;
    });
    total.textContent = String(sum);
    const ok = sum === 100;
    button.disabled = !ok;
    total.parentElement.classList.toggle("error-text", !ok);
  }
  sliders.forEach((slider) => slider.addEventListener("input", update));
  update();
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("form[data-split]").forEach(wireSplit);
  document.querySelectorAll("[data-select-on-focus]").forEach((input) => {
    input.addEventListener("focus", () => input.select());
  });
});
