// A take card's file input, shared by the page at / and the on-device page: a file picked, or dropped on the
// card's drop zone (Enter or Space opens the picker), goes to onFile unless the card is busy.
export function acceptFiles(card, onFile) {
  const input = card.querySelector(".file"), drop = card.querySelector(".drop");
  input.addEventListener("change", () => {
    if (input.files.length) onFile(input.files[0]);
    input.value = "";
  });
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); }
  });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const file = e.dataTransfer && e.dataTransfer.files[0];
    if (file && !card.classList.contains("busy")) onFile(file);
  });
}
